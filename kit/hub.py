"""Hub models, `hf-hub:org/name[@revision]`: their names, their files (config.json and weights) in the local Hugging
Face cache, on the hub or in a folder of them (`model.pretrained_file`), and one line for each way they cannot be had.

huggingface_hub is imported where it is used: the seed's CNNs never need it.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import KitError, first_line

HUB_PREFIX = "hf-hub:"
# org and name as the hub allows them (huggingface_hub's validate_repo_id): ASCII letters, digits, _ - and ., neither
# starting nor ending with - or ., at most 96 characters, no -- or .. anywhere, not ending in .git
_HUB_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
HUB_NAME = re.compile(rf"hf-hub:({_HUB_PART}/{_HUB_PART})(?:@([\w.-]+(?:/[\w.-]+)*))?", re.ASCII)
HUB_NAME_FORM = "hf-hub:org/name[@revision]"
# The files a hub model's folder may hold its weights in (what timm reads from the hub), preferred first.
HUB_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hub_name(name: str) -> bool:
    """A name meant for the hub (valid or not: `hub_repo` says which)."""
    return name.startswith(HUB_PREFIX)


def hub_repo(name: str) -> tuple[str, str | None]:
    """A hub model's repository and revision (None: the default branch); an invalid name is refused in one line,
    before anything asks the hub (which would otherwise be blamed, with advice about the internet)."""
    found = HUB_NAME.fullmatch(name)
    repo, revision = found.groups() if found else ("", None)
    if not found or "--" in repo or ".." in repo or repo.endswith(".git") or ".." in (revision or ""):
        raise KitError(f"config `model.name: {name}`: not a valid hub model name; expected {HUB_NAME_FORM} (org and "
                       f"name of letters, digits, _, - and ., neither starting nor ending with - or ., no -- or ..)")
    return repo, revision


def hub_config_file(name: str) -> Path:
    """A hub model's config.json, from the local Hugging Face cache (HF_HUB_CACHE, HF_HOME) or the hub (with the
    user's own token for a gated model: HF_TOKEN or `hf auth login`; the kit never reads or stores it)."""
    from huggingface_hub import hf_hub_download

    repo, revision = hub_repo(name)
    try:
        return Path(hf_hub_download(repo, "config.json", revision=revision))
    except Exception as err:
        raise KitError(hub_problem(name, err, "its config.json (the architecture)")) from None


def cached_hub_weights(name: str) -> Path | None:
    """The weights file of a hub model in the local Hugging Face cache (what timm read), or None; never the network."""
    from huggingface_hub import try_to_load_from_cache

    repo, revision = hub_repo(name)
    for filename in HUB_WEIGHTS_FILES:
        found = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


def hub_model_folder(weights_file: Path | None) -> Path | None:
    """The folder of a hub model's files that `model.pretrained_file` brings (the folder itself, or the weights file's
    folder) when it holds config.json; None otherwise."""
    if weights_file is None:
        return None
    folder = weights_file if weights_file.is_dir() else weights_file.parent
    return folder if (folder / "config.json").is_file() else None


def weights_in(path: Path) -> Path:
    """`model.pretrained_file` itself, or for a folder (a hub model's files) the weights file in it."""
    if not path.is_dir():
        return path
    found = [path / name for name in HUB_WEIGHTS_FILES if (path / name).is_file()]
    if not found:
        raise KitError(f"config `model.pretrained_file`: {path} is a folder without {' or '.join(HUB_WEIGHTS_FILES)}; "
                       f"point at the weights file itself")
    return found[0]


def hub_problem(name: str, err: Exception, wanted: str) -> str:
    """One line for each way a hub model's `wanted` file cannot be had: gated, unknown or private, not cached and
    offline or out of reach, absent from the repository."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (  # names every huggingface_hub since 0.23 has (Kaggle's may be older than ours)
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _ = hub_repo(name)
    start = f"config `model.name: {name}`"
    if isinstance(err, GatedRepoError):
        return (f"{start}: a gated model: ask for access on https://huggingface.co/{repo} with your account, then "
                f"give your own token (HF_TOKEN in the environment, or `hf auth login`); the kit never stores it")
    if isinstance(err, RevisionNotFoundError):
        return f"{start}: the hub has no such revision of {repo}"
    if isinstance(err, RepositoryNotFoundError):
        return (f"{start}: no such model on the Hugging Face hub, or a private one your token (HF_TOKEN, `hf auth "
                f"login`) cannot see; check https://huggingface.co/{repo}")
    offline_route = (f"without internet (a Kaggle notebook), attach a dataset holding the model and set "
                     f"model.pretrained_file=/kaggle/input/<dataset> (its config.json and weights, as `hf download "
                     f"{repo} --local-dir <folder>` writes them), or point HF_HUB_CACHE at a Hugging Face cache "
                     f"holding it, with HF_HUB_OFFLINE=1")
    if isinstance(err, LocalEntryNotFoundError):
        why = ("HF_HUB_OFFLINE=1 keeps the hub out of reach" if constants.HF_HUB_OFFLINE else
               f"the hub is out of reach ({first_line(err, 'no details')})")
        return f"{start}: {wanted} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; {offline_route}"
    if isinstance(err, EntryNotFoundError):        # on the hub, not in the repository
        return f"{start}: {repo} on the hub lacks {wanted}: timm reads a hub model from config.json and its weights"
    return f"{start}: cannot load {wanted} ({type(err).__name__}: {first_line(err, 'no details')}); {offline_route}"
