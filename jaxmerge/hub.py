"""Models named by Hugging Face Hub reference: `org/name` or `org/name@revision`.

    resolve_model("Qwen/Qwen2.5-0.5B@7ae557604adf67be50417f59c2c2f167def9a775") -> Path of its snapshot

A local directory of the same name wins (as in mergekit and transformers). A reference is
resolved with `huggingface_hub.snapshot_download` into the standard cache (`HF_HUB_CACHE`, or
`HF_HOME`/hub, read when the call is made), fetching only what a checkpoint needs: its
config, safetensors weights (never `.bin` pickles), tokenizer, processor and generation
files (never remote code). `HF_HUB_OFFLINE=1` reads the cache alone; `HF_TOKEN` opens gated
repositories. Every failure is one line naming the reference. The snapshot's directory name
is the commit hash it resolved to (`resolved_revision`), what a run records to be repeated:
`hub_models` (each reference as written, its commit and snapshot) in run.json and
results.json, and `pinned_name` (`org/name@<commit>`) in the recipes it writes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from jaxmerge.errors import CheckpointError

# What a checkpoint directory needs, and nothing that runs code or unpickles.
CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "preprocessor_config.json", "processor_config.json", "chat_template.json",
    "chat_template.jinja",
)
_REFERENCE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(@(?P<revision>[\w./-]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclasses.dataclass(frozen=True)
class HubReference:
    repo_id: str
    revision: str | None = None  # a branch, tag or commit; None: the default branch

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_reference(name: str | os.PathLike) -> HubReference | None:
    """The Hub reference `name` spells, or None: an existing path, or no `org/name[@revision]`."""
    text = os.fspath(name)
    if Path(text).exists():
        return None
    match = _REFERENCE.fullmatch(text)
    return HubReference(match["repo"], match["revision"]) if match else None


def hub_cache() -> Path:
    """The cache `huggingface_hub` uses, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(name: str | os.PathLike) -> Path:
    """A local checkpoint directory for `name`: the path itself when it is not a Hub reference
    (an existing path, or anything else, left for the caller's own error), else the
    reference's snapshot, downloaded if it is not cached (unless offline)."""
    reference = parse_reference(name)
    if reference is None:
        return Path(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        snapshot = Path(snapshot_download(reference.repo_id, revision=reference.revision, cache_dir=hub_cache(),
                                          allow_patterns=list(CHECKPOINT_FILES), local_files_only=offline()))
    except GatedRepoError:
        raise CheckpointError(f"{reference}: a gated repository: accept its terms on the Hub and set HF_TOKEN") \
            from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{reference}: no such repository on the Hugging Face Hub (or a private one: set "
                              "HF_TOKEN), and no local directory of that name") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{reference}: the repository has no revision {reference.revision!r}") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1" if offline() else "the Hub could not be reached"
        raise CheckpointError(f"{reference}: not in the Hugging Face cache ({hub_cache()}) and {why}") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{reference}: the Hub refused the download ({' '.join(str(e).split())})") from None
    if not (snapshot / "config.json").is_file():
        raise CheckpointError(f"{reference}: the snapshot {snapshot} has no config.json")
    if not any(snapshot.glob("*.safetensors")):
        raise CheckpointError(f"{reference}: no safetensors weights in the repository (jaxmerge never loads "
                              ".bin pickles)")
    return snapshot


def resolved_revision(directory: str | os.PathLike) -> str | None:
    """The commit a resolved snapshot is (its directory name in the cache), None for a local directory."""
    path = Path(directory)
    return path.name if path.parent.name == "snapshots" and _COMMIT.fullmatch(path.name) else None


def snapshot_reference(directory: str | os.PathLike) -> HubReference | None:
    """The repository and commit a snapshot directory of a Hugging Face cache holds
    (`.../models--org--name/snapshots/<commit>`): the reference that names exactly its
    weights anywhere, pinned to the commit. None for any other directory."""
    path = Path(directory)
    commit, repo = resolved_revision(path), path.parent.parent.name
    # huggingface_hub's folder name is "models--" + the repo id with "/" as "--" (repo ids never hold "--")
    parts = repo.removeprefix("models--").split("--") if repo.startswith("models--") else []
    if commit is None or len(parts) != 2 or not _REFERENCE.fullmatch("/".join(parts)):
        return None
    return HubReference("/".join(parts), commit)


def pinned_name(path: str) -> str:
    """A model's name for a recipe that reruns exactly: a cache snapshot as its reference pinned
    to its commit (`org/name@<commit>`), any other path as it is. A suffix after the path
    (" (language model)", as a VLM's entry in a recipe reads) is kept."""
    head, sep, tail = path.partition(" (")
    reference = snapshot_reference(head)
    return f"{reference}{sep}{tail}" if reference is not None else path


def short_name(reference: str) -> str:
    """A Hub model's name in tables and plots: its reference without the org, a commit
    shortened to 8 characters (`tiny@3a4b5c6d`)."""
    repo, _, revision = reference.partition("@")
    name = repo.partition("/")[2] or repo
    return f"{name}@{revision[:8] if _COMMIT.fullmatch(revision) else revision}" if revision else name


def hub_models(references) -> dict[str, dict]:
    """What a run records of the models it was given as Hub references, from (checkpoint
    directory, reference as written) pairs: {reference: {"commit": the commit it resolved to,
    "pinned": org/name@commit, "path": the snapshot}}."""
    found = {}
    for directory, written in references:
        reference = snapshot_reference(directory)
        if reference is not None:
            found[written] = {"commit": reference.revision, "pinned": str(reference), "path": str(directory)}
    return found
