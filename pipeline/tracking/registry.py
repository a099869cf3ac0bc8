"""The model registry: one registered model per model family, and its champions.

Each family (``softmax``, ``mlp``, ...: ``config.MODELS``) is registered as ``fashion-mnist-<family>``, so a
champion is only ever compared with models of its own family. A champion is decided by *validation*
accuracy, never test accuracy: choosing by test accuracy would make the test split part of training and its
number an optimistic estimate.

Accuracies are only compared on the same validation split: 0.80 on 5 images says nothing against 0.67 on
2,000. Each version records the digest of the split it was chosen on (tag ``val_digest``), whether that
split is the default one (all the data, the default validation split: tag ``default_split``) and its family
(tag ``model``). Two aliases:

- ``champion-<digest>``: the best version among those chosen on that split;
- ``champion`` (what ``make serve`` serves): the best version chosen on the default split. A version chosen
  on any other split (a smoke run with ``limit``) never takes it. ``python -m pipeline promote`` moves it
  by hand; the next default-split registration moves it back to the default split's best.

The same weights chosen on the same split are registered once (the logged model's weights digest): a study
resumed with the same seed that trains the same trials again finds its version. Registering and moving an
alias can race with another process (here or on another machine): MLflow's alias update is a read then an
insert (the loser of a race gets an error) and offers no compare-and-set. So an alias is pointed at the best
eligible version of all, read afresh, and read back after each move until it holds that version; a move
made on a stale read is then made again by the process that made it.
"""

import contextlib
import time

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError
from pipeline.names import (
    CHAMPION,
    CHAMPION_DECISION_TAG,
    MODEL_FAMILY_TAG,
    REGISTERED_MODEL,
    REGISTERED_VERSION_TAG,
    REGISTRY_DECISION,
    SPLIT_CHAMPION,
    VERSION_DEFAULT_SPLIT_TAG,
    VERSION_MODEL_TAG,
    VERSION_VAL_ACCURACY_TAG,
    VERSION_VAL_DIGEST_TAG,
    WEIGHTS_DIGEST_TAG,
)

ATTEMPTS = 5  # moves in a row that other processes may undo before contest gives up
SETTLE_SECONDS = 0.2  # between a move and the check that it held: long enough for a racing write to land


def alias_holder(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no registered model yet, or no version holds the alias
        return None


def held_accuracy(holder) -> float:
    return float(holder.tags.get(VERSION_VAL_ACCURACY_TAG, "-inf"))


def find_version(client: MlflowClient, name: str, model_id: str, weights: str | None, val_digest: str):
    """The earliest version of ``name`` made from this logged model, or holding the same weights chosen on the
    same split (so neither reuse nor a retrained identical model registers twice)."""
    same = []
    for version in client.search_model_versions(f"name = '{name}'"):
        # the sqlite store leaves ModelVersion.model_id empty; the source URI names the model
        if model_id in (version.model_id, version.source.removeprefix("models:/")) or (
                weights and version.tags.get(WEIGHTS_DIGEST_TAG) == weights
                and version.tags.get(VERSION_VAL_DIGEST_TAG) == val_digest):
            same.append(version)
    return min(same, key=lambda v: int(v.version), default=None)


def register_once(client: MlflowClient, model_uri: str, name: str, tags: dict, val_digest: str):
    """The version of this model (by logged model, or by weights and split), registered if new.

    Two processes registering the same model at once may both register it; the later version is then
    deleted and the earlier one kept, so each of them ends with the same version.
    """
    model_id = mlflow.models.get_model_info(model_uri).model_id
    weights = tags.get(WEIGHTS_DIGEST_TAG)
    version = find_version(client, name, model_id, weights, val_digest)
    if version is not None:
        return version, False
    version = mlflow.register_model(model_uri, name, tags=tags)
    earliest = find_version(client, name, model_id, weights, val_digest)
    if int(earliest.version) < int(version.version):
        client.delete_model_version(name, version.version)
        return earliest, False
    return version, True


def best_version(client: MlflowClient, name: str, eligible):
    """The version of ``name`` with the best val accuracy among those ``eligible`` (the earliest among equals)."""
    versions = [v for v in client.search_model_versions(f"name = '{name}'") if eligible(v)]
    return max(versions, key=lambda v: (held_accuracy(v), -int(v.version)), default=None)


def contest(client: MlflowClient, name: str, alias: str, version, val_accuracy: float, eligible) -> tuple[bool, str]:
    """Point ``alias`` at the best ``eligible`` version, now that ``version`` (val accuracy ``val_accuracy``)
    is registered. Returns (moved to ``version``, reason).

    The alias is decided from all eligible versions, not from its holder alone, and read back after each move:
    a process that moved it on a stale read (another process registered a better version meanwhile) sees that
    it does not hold the best, and moves it again; a move that fails (the other process inserted the alias
    first) is decided again too.
    """
    before = alias_holder(client, name, alias)
    for _ in range(ATTEMPTS):
        best, holder = best_version(client, name, eligible), alias_holder(client, name, alias)
        if holder is not None and holder.version == best.version:
            return explained(alias, version, val_accuracy, before, holder)
        with contextlib.suppress(MlflowException):  # another process inserted the alias first: read it again
            client.set_registered_model_alias(name, alias, best.version)
        time.sleep(SETTLE_SECONDS)
    raise PipelineError(f"the {alias} alias of {name} kept changing while this model was being registered "
                        f"({ATTEMPTS} attempts); run the command again")


def explained(alias: str, version, val_accuracy: float, before, holder) -> tuple[bool, str]:
    """Whether ``alias`` moved to ``version`` (held by ``before``, now by ``holder``), and why, in words."""
    if before is not None and before.version == version.version:
        return False, f"version {version.version} already is the {alias}"
    if holder.version != version.version:
        return False, (f"val accuracy {val_accuracy:.4f} does not beat {alias} version {holder.version}'s "
                       f"{held_accuracy(holder):.4f}")
    if before is None:
        return True, f"first {alias}"
    if not on_default_split(before) and alias == CHAMPION:
        return True, f"version {before.version} was chosen on another split"
    return True, f"val accuracy {val_accuracy:.4f} beats version {before.version}'s {held_accuracy(before):.4f}"


def registry_tags(model_uri: str, val_accuracy: float, val_digest: str, default_split: bool) -> dict:
    """The tags of the version this model would become: what the champions are chosen by."""
    logged = mlflow.get_logged_model(mlflow.models.get_model_info(model_uri).model_id).tags
    return {VERSION_VAL_ACCURACY_TAG: str(val_accuracy), VERSION_VAL_DIGEST_TAG: val_digest,
            VERSION_DEFAULT_SPLIT_TAG: str(default_split).lower(),
            VERSION_MODEL_TAG: logged.get(MODEL_FAMILY_TAG, "softmax"),  # models logged before families: softmax
            **({WEIGHTS_DIGEST_TAG: logged[WEIGHTS_DIGEST_TAG]} if WEIGHTS_DIGEST_TAG in logged else {})}


def on_default_split(version) -> bool:
    return version.tags.get(VERSION_DEFAULT_SPLIT_TAG) == "true"


def promote_if_better(model_uri: str, val_accuracy: float, val_digest: str, default_split: bool) -> dict:
    """Register the model (chosen on the validation split with digest ``val_digest``, the default split or
    not) in its family's registered model, and move ``champion-<val_digest>``, and ``champion`` if it was
    chosen on the default split, to it if it is better.

    The decision is logged on the active run (tags and a JSON artifact) and returned.
    """
    # As the tags show it: 0.9355, not float32's 0.9355000257492065. Six significant digits keep every
    # accuracy apart that a validation split of up to 100,000 images can give (steps of 1/n).
    val_accuracy = float(f"{val_accuracy:.6g}")
    client = MlflowClient()
    tags = registry_tags(model_uri, val_accuracy, val_digest, default_split)
    name = REGISTERED_MODEL.format(tags[VERSION_MODEL_TAG])
    version, new = register_once(client, model_uri, name, tags, val_digest)
    split_alias = SPLIT_CHAMPION.format(val_digest)
    split_promoted, split_reason = contest(client, name, split_alias, version, val_accuracy,
                                           eligible=lambda v: v.tags.get(VERSION_VAL_DIGEST_TAG) == val_digest)
    champion = alias_holder(client, name, CHAMPION)
    if default_split:
        promoted, reason = contest(client, name, CHAMPION, version, val_accuracy, eligible=on_default_split)
    else:
        promoted = False
        reason = (f"not a candidate for {CHAMPION}: chosen on a split other than the default one (all the data, "
                  f"default validation split); {split_reason} ({split_alias})")
    if not new:
        reason = f"version {version.version} already holds this model; {reason}"
    decision = {"model_name": name, "model": tags[VERSION_MODEL_TAG], "version": int(version.version),
                "new_version": new, "val_digest": val_digest, "default_split": default_split,
                "promoted": promoted, "previous_champion": int(champion.version) if champion else None,
                "reason": reason, "split_alias": split_alias, "split_promoted": split_promoted}
    if mlflow.active_run():
        mlflow.set_tags({REGISTERED_VERSION_TAG: version.version, CHAMPION_DECISION_TAG: reason})
        mlflow.log_dict(decision, REGISTRY_DECISION)
    return decision


def promote_by_hand(model: str, version: str) -> str:
    """Move ``champion`` of ``model``'s registered model to ``version``, whatever split it was chosen on."""
    client = MlflowClient()
    name = REGISTERED_MODEL.format(model)
    try:
        target = client.get_model_version(name, version)
    except MlflowException:
        raise PipelineError(f"no version {version} of registered model {name}; see its versions in the MLflow "
                            "UI's Models tab, or pass the --model it belongs to")
    client.set_registered_model_alias(name, CHAMPION, target.version)
    split = "the default split" if on_default_split(target) else f"split {target.tags.get(VERSION_VAL_DIGEST_TAG)}"
    return (f"{CHAMPION} of {name} is now version {target.version} (a {target.tags.get(VERSION_MODEL_TAG, model)} "
            f"model chosen on {split}); the next model registered on the default split moves it back to the "
            "default split's best version")


def described_version(model_uri: str) -> str:
    """For ``models:/<name>@<alias>`` and ``models:/<name>/<version>``: which version that is and what model it
    holds, e.g. ``version 3, model softmax, chosen on the default split``; empty for other URIs."""
    if not model_uri.startswith("models:/"):
        return ""
    name, _, rest = model_uri.removeprefix("models:/").partition("@")
    client = MlflowClient()
    try:
        if rest:
            version = client.get_model_version_by_alias(name, rest)
        elif "/" in name:
            name, number = name.rsplit("/", 1)
            version = client.get_model_version(name, number)
        else:
            return ""  # models:/<model_id>: a logged model, not a registered version
    except MlflowException:
        return ""
    split = "the default split" if on_default_split(version) else f"split {version.tags.get(VERSION_VAL_DIGEST_TAG)}"
    return f"version {version.version}, model {version.tags.get(VERSION_MODEL_TAG, 'softmax')}, chosen on {split}"
