"""State-dict layouts of the same backbone, converted to the timm / torchvision keys we build.

Layouts handled here (``load_pretrained`` detects them from the keys):

- containers: Lightning's ``{"state_dict": ..., "epoch": ..., "optimizer_states": ...}``, Fabric's
  and research code's ``{"model": ...}``, ``{"net": ...}``, ``{"model_state_dict": ...}``, DINO's
  ``{"teacher": ..., "student": ...}`` (:func:`unwrap`);
- key prefixes: DDP/DataParallel ``module.``, torch.compile ``_orig_mod.``, both nested, a
  LightningModule's attribute (``model.``, ``net.``), ``backbone.``, ``teacher.backbone.`` ...:
  the prefix under which most of the module's tensors are found is taken, whatever it is, after
  the package's own conversion (:func:`best_prefix`);
- torch.hub DINOv2 (facebookresearch/dinov2): timm's ViT keys plus ``mask_token``,
  ``register_tokens`` and the SwiGLU ``w12``/``w3`` names;
- HF-transformers DINOv2 (``facebook/dinov2-*``): ``embeddings.*``,
  ``encoder.layer.N.attention.attention.{query,key,value}`` (fused here into timm's ``qkv``),
  ``layer_scale{1,2}.lambda1``, ``layernorm``.

torchvision and timm ResNets share every key name (``conv1``, ``bn1``, ``layerN.M.*``,
``downsample.{0,1}``, ``fc``), so they need no conversion.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

Tensors = dict[str, torch.Tensor]
Layout = Callable[[Tensors], Tensors]

# Checked in this order; DINO checkpoints carry both teacher and student: the teacher is the
# model DINO evaluates and releases.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "teacher", "student", "module")

_HF_PATCH = "embeddings.patch_embeddings.projection.weight"


def unwrap(state: dict) -> tuple[dict, tuple[str, ...]]:
    """The innermost dict of tensors inside checkpoint containers (up to three levels), and the
    container keys taken to reach it (``("state_dict",)`` for a Lightning checkpoint)."""
    path: list[str] = []
    for _ in range(3):
        key = next((k for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if key is None:
            break
        path.append(key)
        state = state[key]
    return state, tuple(path)


def _suffixes(key: str) -> list[tuple[str, str]]:
    """(prefix, rest) for every split of ``key`` at a dot, the whole key (prefix "") first."""
    parts = key.split(".")
    return [
        (".".join(parts[:i]) + ("." if i else ""), ".".join(parts[i:])) for i in range(len(parts))
    ]


def matching(state: Tensors, target: Tensors) -> int:
    """How many of ``state``'s tensors ``target`` has under the same name and shape."""
    return sum(1 for k, v in state.items() if k in target and target[k].shape == v.shape)


def best_prefix(state: Tensors, target: Tensors, layout: Layout | None = None) -> str:
    """The key prefix under which the most of ``target``'s tensors are found, shapes included.

    Every prefix the keys have (split at dots) is a candidate: the tensors under it, with the
    prefix removed, go through ``layout`` (the conversion to the module's names, e.g. torchvision
    names -> a Sequential's indices) and are matched against ``target``. So ``module.``,
    ``_orig_mod.``, ``module._orig_mod.``, a Lightning module's ``model.``, ``backbone.`` or a
    whole model's ``visual.trunk.`` are found without a list of known wrappers, and whatever the
    package converts. "" unless a prefix matches more; on a tie the shortest prefix wins
    (deterministic; two equal heads are then told apart by name). ``layout`` must not add
    tensors: candidates are tried from the largest down, and the search stops where a candidate
    holds fewer tensors than the best match so far.
    """
    groups: dict[str, Tensors] = {}
    for key, value in state.items():
        for prefix, rest in _suffixes(key):
            groups.setdefault(prefix, {})[rest] = value
    best, best_count = "", 0
    for prefix in sorted(groups, key=lambda p: (-len(groups[p]), len(p), p)):
        if len(groups[prefix]) < best_count:
            break
        group = groups[prefix]
        count = matching(layout(group) if layout is not None else group, target)
        if count > best_count or (
            count == best_count and (len(prefix), prefix) < (len(best), best)
        ):
            best, best_count = prefix, count
    return best


def strip_prefix(state: Tensors, prefix: str) -> Tensors:
    """The keys under ``prefix``, without it (the rest of the file is other parts of a model)."""
    if not prefix:
        return state
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _numbered(key: str) -> str:
    """``key`` with its numeric parts (block and Sequential indices) replaced by ``#``."""
    return ".".join("#" if part.isdigit() else part for part in key.split("."))


def extra_blocks(keys: Iterable[str], target: Tensors) -> list[str]:
    """Of ``keys`` (file tensors the module lacks), those of numbered blocks of a kind the module
    has: ``layer1.2.conv1.weight`` of a ResNet-34 against a ResNet-18's blocks 0 and 1, or a
    ViT's ``blocks.11.*`` against a shallower one. Such a file is a deeper model, not a fit."""
    kinds = {_numbered(k) for k in target}
    return [k for k in keys if _numbered(k) in kinds]


_RESNETS = {
    ("basic", (2, 2, 2, 2)): "ResNet-18",
    ("basic", (3, 4, 6, 3)): "ResNet-34",
    ("bottleneck", (3, 4, 6, 3)): "ResNet-50",
    ("bottleneck", (3, 4, 23, 3)): "ResNet-101",
    ("bottleneck", (3, 8, 36, 3)): "ResNet-152",
}


def _counts(state: Tensors, pattern: str) -> dict[str, set[int]]:
    """Block indices per stage of the keys that match ``pattern`` (groups: stage, block)."""
    found: dict[str, set[int]] = {}
    regex = re.compile(pattern)
    for key in state:
        match = regex.search(key)
        if match is not None:
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
    return found


def describe(state: Tensors) -> str:
    """What a state dict looks like, in a few words, for messages about a file that does not fit.

    Recognises ResNets (torchvision/timm names; depth from the blocks per stage), ViTs (timm and
    torch.hub, HF-transformers) and ConvNeXts (timm); otherwise the tensor count and first keys.
    """
    stages = _counts(state, r"(?:^|\.)layer([1-4])\.(\d+)\.conv[12]\.weight$")
    if stages:
        kind = "bottleneck" if any(k.endswith(".conv3.weight") for k in state) else "basic"
        blocks = tuple(len(stages.get(str(i), ())) for i in range(1, 5))
        name = _RESNETS.get((kind, blocks))
        plan = "-".join(map(str, blocks))
        return f"a {name} ({kind} blocks {plan})" if name else f"a ResNet ({kind} blocks {plan})"
    for pattern, what in (
        (r"(?:^|\.)(blocks)\.(\d+)\.attn\.qkv\.weight$", "a ViT"),
        (r"(?:^|\.)(encoder\.layer)\.(\d+)\.attention\.attention\.query\.weight$", "an HF ViT"),
    ):
        depth = _counts(state, pattern)
        if depth:
            width = next(v.shape[-1] for k, v in state.items() if re.search(pattern, k) is not None)
            return f"{what} (depth {len(next(iter(depth.values())))}, width {width})"
    stages = _counts(state, r"(?:^|\.)stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight$")
    if stages:
        plan = "-".join(str(len(stages[s])) for s in sorted(stages, key=int))
        return f"a ConvNeXt (blocks {plan})"
    first = ", ".join(list(state)[:3])
    return f"{len(state)} tensors ({first}{', ...' if len(state) > 3 else ''})"


def is_hf_dinov2(state: Tensors) -> str | None:
    """The prefix of an HF-transformers DINOv2 state dict ("" or e.g. ``dinov2.``), else None."""
    for key in state:
        if key.endswith(_HF_PATCH):
            return key[: -len(_HF_PATCH)]
    return None


def hf_dinov2_to_timm(state: Tensors) -> Tensors:
    """HF-transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` keys -> timm ViT keys.

    Exact: query/key/value are concatenated in that order into ``qkv`` (timm splits ``qkv`` the
    same way), every other tensor is renamed unchanged. Keys outside the backbone (a
    classifier) keep their names and show up as unexpected.
    """
    prefix = is_hf_dinov2(state) or ""
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    out: Tensors = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    renames = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    layer_renames = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "mlp.weights_in": "mlp.fc1",  # SwiGLU (giant): timm's packed fc1 chunks in the same order
        "mlp.weights_out": "mlp.fc2",
    }
    layer_re = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
    qkv_re = re.compile(r"attention\.attention\.(query|key|value)\.(weight|bias)")
    for key, value in state.items():
        if key in renames:
            out[renames[key]] = value
            continue
        match = layer_re.fullmatch(key)
        if match is None:
            out[key] = value
            continue
        index, rest = match.groups()
        qkv = qkv_re.fullmatch(rest)
        if qkv is not None:
            fused.setdefault(f"blocks.{index}.attn.qkv.{qkv.group(2)}", {})[qkv.group(1)] = value
            continue
        name, _, param = rest.rpartition(".")
        if rest in layer_renames:  # ls gammas: the whole rest is the name
            out[f"blocks.{index}.{layer_renames[rest]}"] = value
        elif name in layer_renames:
            out[f"blocks.{index}.{layer_renames[name]}.{param}"] = value
        else:
            out[key] = value
    for key, parts in fused.items():
        if set(parts) == {"query", "key", "value"}:
            out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
        else:  # an incomplete q/k/v set: left under its own names, reported as unexpected
            out.update({f"{key}.{name}": v for name, v in parts.items()})
    return hub_dinov2_to_timm(out)


def timm_to_hf_dinov2(state: Tensors, prefix: str = "") -> Tensors:
    """timm DINOv2 ViT keys -> HF-transformers ``Dinov2Model`` keys (the inverse of the above).

    Used to check the conversion; a timm model has no ``mask_token``, so a zero one is added
    as in ``Dinov2Embeddings``.
    """
    out: Tensors = {}
    dim = state["cls_token"].shape[-1]
    out[f"{prefix}embeddings.mask_token"] = torch.zeros(1, dim, dtype=state["cls_token"].dtype)
    if "reg_token" in state:  # a zero class position: folding it into cls_token is then exact
        pos = state["pos_embed"]
        out[f"{prefix}embeddings.register_tokens"] = state["reg_token"]
        out[f"{prefix}embeddings.cls_token"] = state["cls_token"]
        out[f"{prefix}embeddings.position_embeddings"] = torch.cat(
            [torch.zeros_like(pos[:, :1]), pos], dim=1
        )
    else:
        out[f"{prefix}embeddings.cls_token"] = state["cls_token"]
        out[f"{prefix}embeddings.position_embeddings"] = state["pos_embed"]
    out[f"{prefix}embeddings.patch_embeddings.projection.weight"] = state["patch_embed.proj.weight"]
    out[f"{prefix}embeddings.patch_embeddings.projection.bias"] = state["patch_embed.proj.bias"]
    out[f"{prefix}layernorm.weight"] = state["norm.weight"]
    out[f"{prefix}layernorm.bias"] = state["norm.bias"]
    inverse = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    block_re = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)")
    for key, value in state.items():
        match = block_re.fullmatch(key)
        if match is None:
            continue
        index, name, param = match.groups()
        base = f"{prefix}encoder.layer.{index}."
        if name == "attn.qkv":
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"{base}attention.attention.{part}.{param}"] = chunk.clone()
        elif name in ("ls1", "ls2"):
            out[f"{base}layer_scale{name[-1]}.lambda1"] = value
        else:
            out[f"{base}{inverse[name]}.{param}"] = value
    return out


def hub_dinov2_to_timm(state: Tensors) -> Tensors:
    """torch.hub DINOv2 keys -> timm's (identity for a timm state dict).

    ``mask_token`` is used only in DINOv2's masked pre-training and has no timm counterpart.
    With registers, timm's ViT adds no position embedding to the class token
    (``no_embed_class``), so the hub's class position is folded into ``cls_token``.
    """
    if "mask_token" not in state and "register_tokens" not in state:
        return state
    if "register_tokens" in state and not {"cls_token", "pos_embed"} <= set(state):
        return state  # a part of a file, not a whole hub model: left to be reported as it is
    out = {k: v for k, v in state.items() if k != "mask_token"}
    if "register_tokens" in out:
        pos = out.pop("pos_embed")
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    swiglu = re.compile(r"(blocks\.\d+\.mlp\.)(w12|w3)(\.(?:weight|bias))")
    return {
        swiglu.sub(lambda m: m[1] + ("fc1" if m[2] == "w12" else "fc2") + m[3], k): v
        for k, v in out.items()
    }
