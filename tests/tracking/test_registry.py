"""The registry compares validation accuracies only on the same validation split."""


import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.config import DataConfig, TrainConfig
from pipeline.core.models import build_model
from pipeline.core.splits import array_digest, prepare_splits
from pipeline.names import CHAMPION, MODEL_NAME, SPLIT_CHAMPION, VERSION_VAL_DIGEST_TAG
from pipeline.tracking.logged_models import log_model
from pipeline.tracking.registry import promote_if_better


def val_digest(splits) -> str:
    return array_digest(splits.val_x, splits.val_y)


@pytest.fixture(scope="module")
def tiny_split(real_data_dir, tmp_path_factory):
    """Another split of the real data: 5 images per split (too few to judge by)."""
    cfg = DataConfig(data_dir=str(real_data_dir), val_size=10_000, limit=5)
    splits, path, _ = prepare_splits(cfg, cache_root=tmp_path_factory.mktemp("tiny"))
    return splits, path


# ---------------------------------------------------------------------------------------------------
# 2. Like with like: the registry and resumed studies


def register(splits, val_accuracy: float, digest: str) -> dict:
    """A real logged model, offered to the registry as chosen on the split with ``digest``."""
    with mlflow.start_run():
        info = log_model(build_model(TrainConfig()), splits.val_x[:4], step=0)
        return promote_if_better(info.model_uri, val_accuracy, digest)


@pytest.mark.slow
def test_champion_is_compared_only_on_the_same_validation_split(data_slice, tiny_split, mlflow_store):
    big, small = data_slice[0], tiny_split[0]
    big_digest, small_digest = val_digest(big), val_digest(small)
    assert big_digest != small_digest
    client = MlflowClient()
    holder = lambda alias: int(client.get_model_version_by_alias(MODEL_NAME, alias).version)  # noqa: E731

    first = register(big, 0.67, big_digest)  # validated on 2,000 images
    assert first["promoted"] and holder(CHAMPION) == 1

    # 0.80 on 5 images must not take the alias from 0.67 on 2,000
    tiny = register(small, 0.80, small_digest)
    assert not tiny["promoted"] and holder(CHAMPION) == 1
    assert "chosen on another validation split" in tiny["reason"] and small_digest in tiny["reason"]
    assert tiny["split_promoted"] and holder(SPLIT_CHAMPION.format(small_digest)) == 2

    better = register(big, 0.70, big_digest)  # the same split: compared, and better
    assert better["promoted"] and holder(CHAMPION) == 3 == holder(SPLIT_CHAMPION.format(big_digest))
    worse = register(big, 0.60, big_digest)
    assert not worse["promoted"] and "does not beat champion version 3's 0.7000" in worse["reason"]
    assert holder(SPLIT_CHAMPION.format(big_digest)) == 3

    versions = {int(v.version): v.tags for v in client.search_model_versions(f"name = '{MODEL_NAME}'")}
    assert versions[2][VERSION_VAL_DIGEST_TAG] == small_digest
    assert {versions[v][VERSION_VAL_DIGEST_TAG] for v in (1, 3, 4)} == {big_digest}
