"""The model registry: one registered model, and the alias ``champion`` on its best version.

The champion is decided by *validation* accuracy, never test accuracy: choosing by test accuracy would
make the test split part of training and its number an optimistic estimate.
"""

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.names import (CHAMPION, CHAMPION_DECISION_TAG, MODEL_NAME, REGISTERED_VERSION_TAG, REGISTRY_DECISION,
                            VERSION_VAL_ACCURACY_TAG)


def current_champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no registered model yet, or no version holds the alias
        return None


def find_version(client: MlflowClient, name: str, model_id: str):
    """An existing version of ``name`` made from this logged model (so reuse never registers twice)."""
    for version in client.search_model_versions(f"name = '{name}'"):
        # the sqlite store leaves ModelVersion.model_id empty; the source URI names the model
        if model_id in (version.model_id, version.source.removeprefix("models:/")):
            return version
    return None


def promote_if_better(model_uri: str, val_accuracy: float, name: str = MODEL_NAME) -> dict:
    """Register the model and move ``champion`` to it if its val accuracy beats the champion's.

    The decision is logged on the active run (tags and a JSON artifact) and returned.
    """
    client = MlflowClient()
    model_id = mlflow.models.get_model_info(model_uri).model_id
    version = find_version(client, name, model_id)
    if version is None:
        version = mlflow.register_model(model_uri, name, tags={VERSION_VAL_ACCURACY_TAG: str(val_accuracy)})
    champion = current_champion(client, name)
    champion_acc = float(champion.tags.get(VERSION_VAL_ACCURACY_TAG, "-inf")) if champion else None
    if champion is not None and champion.version == version.version:
        promoted, reason = False, f"version {version.version} already is the {CHAMPION}"
    elif champion is None or val_accuracy > champion_acc:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        promoted = True
        reason = (f"first {CHAMPION}" if champion is None else
                  f"val accuracy {val_accuracy:.4f} beats version {champion.version}'s {champion_acc:.4f}")
    else:
        promoted = False
        reason = (f"val accuracy {val_accuracy:.4f} does not beat {CHAMPION} version "
                  f"{champion.version}'s {champion_acc:.4f}")
    decision = {"model_name": name, "version": int(version.version), "promoted": promoted,
                "previous_champion": int(champion.version) if champion else None, "reason": reason}
    if mlflow.active_run():
        mlflow.set_tags({REGISTERED_VERSION_TAG: version.version, CHAMPION_DECISION_TAG: reason})
        mlflow.log_dict(decision, REGISTRY_DECISION)
    return decision
