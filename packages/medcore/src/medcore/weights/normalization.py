"""The input normalisation pretrained weights expect: ``mean``, ``std``, ``input_size``,
``interpolation``, ``crop_pct``, from a timm model's ``pretrained_cfg`` and the weights' own
config files (found by :func:`medcore.weights.pretrained.resolve_weights`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct")


def data_config(
    model: nn.Module | None = None,
    pretrained_cfg: dict[str, Any] | None = None,
    weights_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``mean``, ``std``, ``input_size``, ``interpolation``, ``crop_pct`` the weights expect.

    From, in increasing precedence: a timm ``model``'s ``pretrained_cfg`` (through
    ``timm.data.resolve_data_config``), an explicit ``pretrained_cfg`` dict (timm's keys), and the
    weights' own config (``ResolvedWeights.config``: a timm ``config.json``'s ``pretrained_cfg``,
    an open_clip ``preprocess_cfg`` or an HF preprocessor's ``image_mean``/``image_std``).
    """
    cfg: dict[str, Any] = {}
    if model is not None:
        model_cfg = getattr(model, "pretrained_cfg", None)
        if not isinstance(model_cfg, dict):
            raise ValueError(
                f"{type(model).__name__} has no timm pretrained_cfg: pass pretrained_cfg"
            )
        cfg.update(model_cfg)
    cfg.update(pretrained_cfg or {})
    cfg.update(_from_weights_config(weights_config or {}))
    if not cfg:
        raise ValueError("data_config needs a timm model, a pretrained_cfg or a weights config")
    try:
        from timm.data import resolve_data_config
    except ImportError:
        resolve_data_config = None
    if resolve_data_config is not None:
        out = resolve_data_config(pretrained_cfg=cfg, model=model)
    else:
        absent = [k for k in _KEYS if k not in cfg]
        if absent:
            raise ValueError(
                f"pretrained_cfg lacks {', '.join(absent)} (and timm is not installed)"
            )
        out = {k: cfg[k] for k in _KEYS}
    return {
        "mean": tuple(float(v) for v in out["mean"]),
        "std": tuple(float(v) for v in out["std"]),
        "input_size": tuple(int(v) for v in out["input_size"]),
        "interpolation": str(out["interpolation"]),
        "crop_pct": float(out["crop_pct"]),
    }


def _from_weights_config(config: dict[str, Any]) -> dict[str, Any]:
    """timm's data-config keys from a weights folder's config (timm, open_clip or HF)."""
    out: dict[str, Any] = {}
    timm_cfg = config.get("pretrained_cfg")
    if isinstance(timm_cfg, dict):
        out.update({k: timm_cfg[k] for k in _KEYS if k in timm_cfg})
    clip_cfg = config.get("preprocess_cfg")
    if isinstance(clip_cfg, dict):
        out.update({k: clip_cfg[k] for k in ("mean", "std", "interpolation") if k in clip_cfg})
        size = config.get("model_cfg", {}).get("vision_cfg", {}).get("image_size")
        if isinstance(size, int):
            out["input_size"] = (3, size, size)
    pre = config.get("preprocessor", config)
    if "image_mean" in pre and "image_std" in pre:
        out["mean"], out["std"] = pre["image_mean"], pre["image_std"]
        crop = pre.get("crop_size")
        size = pre.get("size")
        if isinstance(crop, dict) and "height" in crop:
            out["input_size"] = (3, int(crop["height"]), int(crop["width"]))
        if isinstance(size, dict) and "shortest_edge" in size and "input_size" in out:
            out["crop_pct"] = out["input_size"][1] / size["shortest_edge"]
        if pre.get("resample") in _PIL_RESAMPLE:
            out["interpolation"] = _PIL_RESAMPLE[pre["resample"]]
    return out


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)


IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
