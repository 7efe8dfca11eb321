"""Resolution: a local directory, or a repo id found in the HF cache, or (with a network) downloaded.

The HF cache keeps each file once under `models--org--name/blobs/` and links to it from
`snapshots/<commit>/`; `trusted_root` says which folder a checkpoint's files may point into.
"""

from __future__ import annotations

import hashlib
import os
import re

from .errors import ResolveError

HUB_KWARGS = (
    "revision",
    "cache_dir",
    "local_files_only",
    "token",
    "subfolder",
    "force_download",
    "proxies",
    "resume_download",
    "use_auth_token",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # a blob's name is its hash
# What a model needs; weights in .bin are fetched only when no safetensors exist.
_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def hub_cache_dir() -> str:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> str | None:
    """The snapshot directory of repo_id in the HF cache layout, or None when it is not cached."""
    repo_dir = os.path.join(cache_dir or hub_cache_dir(), "models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    commit = revision if _COMMIT.match(revision) else None
    if commit is None:
        ref = os.path.join(repo_dir, "refs", revision)
        if os.path.isfile(ref):
            with open(ref, encoding="utf-8") as f:
                commit = f.read().strip()
    if commit is None or (not _COMMIT.match(commit) and "/" in commit):
        return None
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    return snapshot if os.path.isdir(snapshot) else None


def trusted_root(directory: str) -> str:
    """The folder a model directory's files (and symlinks) must stay inside: the repo's cache folder
    (`.../models--org--name`) for a snapshot of the HF cache, else the directory itself."""
    real = os.path.realpath(directory)
    parts = real.split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            return os.sep.join(parts[:i])
    return real


def inside(directory: str, rel: str, source: str) -> str:
    """Resolve rel inside directory, refusing absolute paths, '..' and symlinks that leave its trusted root."""
    from .errors import CheckpointError

    if (
        not isinstance(rel, str)
        or not rel
        or "\x00" in rel
        or os.path.isabs(rel)
        or os.path.splitdrive(rel)[0]
    ):
        raise CheckpointError(
            f"{source}: shard path {rel!r} must be a relative file name inside the model directory"
        )
    root = trusted_root(directory)
    full = os.path.realpath(os.path.join(directory, rel))
    if os.path.commonpath([root, full]) != root:
        raise CheckpointError(f"{source}: shard path {rel!r} points outside the model directory {directory}")
    return full


def verify_files(directory: str, files: list[str]) -> str:
    """Check a snapshot's files (the given ones, config.json and generation_config.json) against the HF
    cache's blob names: sha256 for LFS files, git's blob sha1 for the rest. A mismatch is a CheckpointError
    naming the file; the result is one line for the load report."""
    from .errors import CheckpointError

    root = trusted_root(directory)
    if root == os.path.realpath(directory):
        return f"verify: {directory} is not in the Hugging Face cache, so there are no hashes to check"
    extra = [os.path.join(directory, n) for n in ("config.json", "generation_config.json")]
    names = {os.path.realpath(os.path.join(directory, n)): n for n in os.listdir(directory)}
    checked, unchecked = [], []
    for path in list(files) + [p for p in extra if os.path.isfile(p) and p not in files]:
        real = os.path.realpath(path)
        path = os.path.join(directory, names.get(real, os.path.basename(path)))  # as the snapshot names it
        blob = os.path.basename(real)
        if os.path.dirname(real) != os.path.join(root, "blobs") or not _BLOB.fullmatch(blob):
            unchecked.append(os.path.basename(path))
            continue
        algo = "sha256" if len(blob) == 64 else "sha1"
        try:
            got = _file_hash(real, algo)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        if got != blob:
            raise CheckpointError(
                f"{path}: content does not match its Hugging Face cache hash ({algo} {got}, expected {blob}); "
                f"the file is corrupt or was changed after download: delete {real} and download it again"
            )
        checked.append(os.path.basename(path))
    line = f"verify: {len(checked)} files match their Hugging Face cache hashes ({', '.join(checked)})"
    return line + (f"; not in the cache's blobs, unchecked: {', '.join(unchecked)}" if unchecked else "")


def _file_hash(path: str, algo: str) -> str:
    """sha256 of the content (an LFS blob's name), or git's sha1 of "blob SIZE\\0" + content."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        if algo == "sha1":
            h.update(b"blob %d\0" % os.fstat(f.fileno()).st_size)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _offline(local_files_only: bool) -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return local_files_only or flag.upper() in ("1", "ON", "YES", "TRUE")


def resolve_model_dir(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    subfolder: str = "",
    **_: object,
) -> str:
    """Turn a directory or repo id (with an optional subfolder) into a local directory holding the model's files."""
    name = os.fspath(path_or_repo_id)
    if os.path.isdir(name):
        directory = os.path.abspath(name)
    elif os.path.exists(name):
        raise ResolveError(f"{name}: expected a model directory, found a file")
    elif not _REPO_ID.match(name) or name.count("/") > 1:
        raise ResolveError(f"{name}: no such directory, and not a valid Hugging Face repo id ('org/name')")
    else:
        cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        directory = cached_snapshot(name, revision, cache_dir)
        if directory is None:
            if _offline(local_files_only):
                raise ResolveError(
                    f"{name}: not found in the Hugging Face cache at {cache_dir or hub_cache_dir()} "
                    "and downloads are disabled (offline)"
                )
            directory = _download(name, revision, cache_dir, token)
    if subfolder:
        directory = os.path.join(directory, subfolder)
        if not os.path.isdir(directory):
            raise ResolveError(f"{name}: no subfolder {subfolder!r}")
    return directory


def _download(repo_id: str, revision: str | None, cache_dir: str | None, token) -> str:
    """Fetch only the files a model needs with huggingface_hub."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=_PATTERNS
        )
        if not any(f.endswith(".safetensors") for f in os.listdir(path)):
            path = snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                allow_patterns=_PATTERNS + ["*.bin"],
            )
        return path
    except Exception as e:  # network, auth and missing-repo errors all mean: could not resolve
        raise ResolveError(
            f"{repo_id}: not a local directory, not in the HF cache, and download failed ({e})"
        ) from None
