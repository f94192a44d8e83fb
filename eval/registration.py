"""How lmms-eval finds the model `mm15`: the `lmms_eval.models` entry point of this package.

lmms-eval (0.7) builds its model registry from its own list plus every installed package's entry
points in the group `lmms_eval.models`, each a `ModelManifest` or a callable returning one
(`lmms_eval.models.registry_v2.ModelRegistryV2.load_entrypoint_manifests`). pyproject.toml declares

    [project.entry-points."lmms_eval.models"]
    mm15 = "mm15.eval.registration:manifest"

so after an install `lmms-eval --model mm15 ...` resolves to `mm15.eval.lmms_model.MM15LMM`,
imported only when a run asks for it (building the registry imports neither torch nor mm15).
(`lmms-eval models` prints lmms-eval's own list only; entry-point models are not in it.)

    python -c "from lmms_eval.models import get_model; print(get_model('mm15'))"
"""

from __future__ import annotations

MODEL_NAME = "mm15"
MODEL_CLASS = "mm15.eval.lmms_model.MM15LMM"


def manifest():
    """The `ModelManifest` of the `mm15` model (a simple model: prompt text and visuals)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS)
