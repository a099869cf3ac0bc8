"""The model registry: one registered model, and the alias ``champion`` on its best version.

The champion is decided by *validation* accuracy, never test accuracy: choosing by test accuracy would
make the test split part of training and its number an optimistic estimate.

Accuracies are only compared on the same validation split: 0.80 on 5 images says nothing against 0.67
on 2,000. Each version records the digest of the split it was chosen on (tag ``val_digest``); the alias
``champion-<digest>`` marks the best version of each split, and ``champion`` moves only between
versions of the split of the version that holds it (the first version registered gives it its split).
"""

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.names import (
    CHAMPION,
    CHAMPION_DECISION_TAG,
    MODEL_NAME,
    REGISTERED_VERSION_TAG,
    REGISTRY_DECISION,
    SPLIT_CHAMPION,
    VERSION_VAL_ACCURACY_TAG,
    VERSION_VAL_DIGEST_TAG,
)


def alias_holder(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no registered model yet, or no version holds the alias
        return None


def current_champion(client: MlflowClient, name: str):
    return alias_holder(client, name, CHAMPION)


def find_version(client: MlflowClient, name: str, model_id: str):
    """An existing version of ``name`` made from this logged model (so reuse never registers twice)."""
    for version in client.search_model_versions(f"name = '{name}'"):
        # the sqlite store leaves ModelVersion.model_id empty; the source URI names the model
        if model_id in (version.model_id, version.source.removeprefix("models:/")):
            return version
    return None


def contest(client: MlflowClient, name: str, alias: str, version, val_accuracy: float) -> tuple[bool, str]:
    """Move ``alias`` to ``version`` if its val accuracy beats the holder's; the caller ensures that
    both were validated on the same split. Returns (moved, reason)."""
    holder = alias_holder(client, name, alias)
    held = float(holder.tags.get(VERSION_VAL_ACCURACY_TAG, "-inf")) if holder else None
    if holder is not None and holder.version == version.version:
        return False, f"version {version.version} already is the {alias}"
    if holder is None or val_accuracy > held:
        client.set_registered_model_alias(name, alias, version.version)
        return True, (f"first {alias}" if holder is None else
                      f"val accuracy {val_accuracy:.4f} beats version {holder.version}'s {held:.4f}")
    return False, f"val accuracy {val_accuracy:.4f} does not beat {alias} version {holder.version}'s {held:.4f}"


def promote_if_better(model_uri: str, val_accuracy: float, val_digest: str, name: str = MODEL_NAME) -> dict:
    """Register the model (chosen on the validation split with digest ``val_digest``) and move
    ``champion-<val_digest>``, and ``champion`` if it is held on the same split, to it if it is better.

    The decision is logged on the active run (tags and a JSON artifact) and returned.
    """
    client = MlflowClient()
    model_id = mlflow.models.get_model_info(model_uri).model_id
    version = find_version(client, name, model_id)
    if version is None:
        version = mlflow.register_model(model_uri, name, tags={VERSION_VAL_ACCURACY_TAG: str(val_accuracy),
                                                               VERSION_VAL_DIGEST_TAG: val_digest})
    split_alias = SPLIT_CHAMPION.format(val_digest)
    split_promoted, split_reason = contest(client, name, split_alias, version, val_accuracy)
    champion = current_champion(client, name)
    champion_digest = champion.tags.get(VERSION_VAL_DIGEST_TAG) if champion else None
    if champion is None or champion_digest == val_digest:
        promoted, reason = contest(client, name, CHAMPION, version, val_accuracy)
    else:
        promoted = False
        reason = (f"not compared with {CHAMPION} version {champion.version}: that one was chosen on another "
                  f"validation split ({champion_digest or 'not recorded'}, this one on {val_digest}); "
                  f"{split_reason} ({split_alias})")
    decision = {"model_name": name, "version": int(version.version), "val_digest": val_digest,
                "promoted": promoted, "previous_champion": int(champion.version) if champion else None,
                "reason": reason, "split_alias": split_alias, "split_promoted": split_promoted}
    if mlflow.active_run():
        mlflow.set_tags({REGISTERED_VERSION_TAG: version.version, CHAMPION_DECISION_TAG: reason})
        mlflow.log_dict(decision, REGISTRY_DECISION)
    return decision
