"""Is a hub model or dataset usable here: a local directory, the local HF cache, or a reachable hub.

Offline, a hub id fails in about a second with the command to download it and the override to
use instead, rather than hanging on the network. No heavy imports: data loading and the feature
networks use it too.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

HUB_URL = "https://huggingface.co"
# model.pretrained values that are no hub id or folder: models built in code with random weights
# (tiny test models; the full-size published architectures).
BUILT_IN_CODE = ("tiny", "random")
TINY_VERSION = 2  # bump when the tiny models built in code change (2: the closed-form autoencoding VAE, UNet GroupNorm of 8 groups)


class OfflineError(RuntimeError):
    """A hub resource is needed, is not cached locally, and the hub can't be reached."""


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE=1``: the project's offline switch, for the hub and any other download."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def reachable(url: str, timeout: float = 3.0) -> bool:
    """False in offline mode or when ``url``'s host does not accept a connection in ``timeout`` s."""
    if offline_mode():
        return False
    try:
        socket.create_connection((urlparse(url).hostname, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    return reachable(os.environ.get("HF_ENDPOINT", HUB_URL), timeout)


def check_hub_resource(name: str, repo_type: str, key: str, probe_file: str) -> None:
    """Pass if ``name`` is a local directory, is in the HF cache, or the hub is reachable."""
    if Path(name).expanduser().is_dir():
        return
    if name.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"{key}={name!r}: no such directory")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, probe_file, repo_type=repo_type)
    if isinstance(cached, str) or hub_reachable():
        return
    kind = "dataset" if repo_type == "dataset" else "model"
    raise OfflineError(
        f"{key}={name!r} is a Hugging Face hub {kind} id, it is not in the local cache, and the hub "
        f"can't be reached (offline). Download it where the hub is reachable, e.g.\n"
        f"    hf download {'--repo-type dataset ' if kind == 'dataset' else ''}{name} "
        f"--local-dir /path/to/{name.split('/')[-1]}   (older huggingface_hub: huggingface-cli download)\n"
        f"then point at the copy: {key}=/path/to/{name.split('/')[-1]}"
    )


def source_fingerprint(name: str, repo_type: str = "model", probe_file: str = "model_index.json") -> dict:
    """What identifies the weights behind a local directory or hub id, without hashing gigabytes:
    a local directory's files (relative path, size, modification time); a hub id's cached
    snapshot revision (or "unresolved" when it is not cached)."""
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {
            "dir": str(path.resolve()),
            "files": [[str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        }
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, probe_file, repo_type=repo_type)
    revision = Path(cached).parent.name if isinstance(cached, str) else "unresolved"
    return {"hub": name, "revision": revision}


def model_fingerprint(model_cfg) -> dict:
    """The model config plus the fingerprint of its weights (unless built in code, seeded)."""
    fingerprint = {k: model_cfg[k] for k in ("family", "pretrained", "vae", "variant")}
    if model_cfg.pretrained == "tiny":
        fingerprint["tiny_version"] = TINY_VERSION  # cached latents and images of older tiny models are stale
    if model_cfg.pretrained not in BUILT_IN_CODE:
        fingerprint["weights"] = source_fingerprint(model_cfg.pretrained)
    if model_cfg.vae:
        fingerprint["vae_weights"] = source_fingerprint(model_cfg.vae, probe_file="config.json")
    return fingerprint
