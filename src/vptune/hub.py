"""Task folders on the Hugging Face Hub: ``hf://<repo>[/<subfolder>][@<revision>]`` read through
``huggingface_hub`` (its cache; ``HF_HUB_OFFLINE=1`` reads the cache alone), and :func:`push_task` uploading a task
folder with a generated model card.

What is read from the Hub is checked as a local folder is (the record, the weights file's header against it, the
backbone's fingerprint): :func:`vptune.load_task` reads the downloaded folder. ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and
``HF_TOKEN`` are read when a call is made.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .taskcheck import TaskFileError

PREFIX = "hf://"
_SPEC = re.compile(r"hf://(?P<repo>[\w.-]+/[\w.-]+)(?P<sub>(/[\w.-]+)*)(@(?P<revision>[\w./-]+))?")


@dataclass(frozen=True)
class HubTask:
    """Where a task folder lies on the Hub."""

    repo: str
    subfolder: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, spec: str) -> HubTask:
        match = _SPEC.fullmatch(spec)
        if match is None or ".." in spec:
            raise ValueError(
                f"{spec!r} is not a Hub task: write hf://<user>/<repo>[/<subfolder>][@<revision>] "
                "(e.g. hf://me/vpt-tasks/eurosat@main)"
            )
        sub = match["sub"].strip("/") or None
        return cls(match["repo"], sub, match["revision"])

    @property
    def name(self) -> str:
        """The task's name when served: its subfolder's last part, else the repository's name."""
        return (self.subfolder or self.repo).rsplit("/", 1)[-1]


def is_hub(path: object) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def _hub():
    try:
        import huggingface_hub
    except ImportError as error:
        raise ImportError("hf:// task folders need huggingface_hub: pip install 'vptune[hub]'") from error
    return huggingface_hub


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_folder(spec: str, files: tuple[str, ...]) -> Path:
    """The local copy of a Hub task folder's ``files`` (downloaded into the Hugging Face cache, or found there when
    offline); the first file must be there."""
    hub, where = _hub(), HubTask.parse(spec)
    prefix = f"{where.subfolder}/" if where.subfolder else ""
    try:
        local = hub.snapshot_download(
            where.repo,
            revision=where.revision,
            allow_patterns=[prefix + name for name in files],
            cache_dir=os.environ.get("HF_HUB_CACHE"),
            endpoint=os.environ.get("HF_ENDPOINT"),
            local_files_only=_offline(),
        )
    except hub.errors.LocalEntryNotFoundError as error:
        raise TaskFileError(
            f"{spec} is not in the Hugging Face cache and HF_HUB_OFFLINE is set (or the Hub cannot be reached): "
            "download it once online"
        ) from error
    except (hub.errors.RepositoryNotFoundError, hub.errors.RevisionNotFoundError) as error:
        raise TaskFileError(f"{spec}: {type(error).__name__}: no such repository or revision on the Hub") from error
    folder = Path(local) / (where.subfolder or "")
    if not (folder / files[0]).is_file():
        raise TaskFileError(f"{spec} holds no task folder: {prefix}{files[0]} is not in the repository")
    return folder


def model_card(record: dict, repo: str) -> str:
    """A Hub model card for a task folder's record: what it is, what it was trained on, how well it did, how to load
    it."""
    backbone, data, metrics = record["backbone"], record.get("data") or {}, record.get("metrics") or {}
    spec = backbone["spec"]
    base = spec[3:] if spec.startswith("hf:") and not Path(spec[3:]).exists() else None  # a Hub id, not a folder
    accuracy = metrics.get("test_accuracy")
    front = ["---", "library_name: vptune", "pipeline_tag: image-classification"]
    front += ["tags:", "- vptune", "- visual-prompt-tuning", "- image-classification"]
    if base:
        front.append(f"base_model: {base}")
    lines = [
        *front,
        "---",
        "",
        f"# {repo.rsplit('/', 1)[-1]}",
        "",
        f"A **{record['method']}** task trained with [vptune](https://github.com/) on a frozen `{backbone['spec']}` "
        f"backbone (fingerprint `{backbone['fingerprint']}`): {record.get('trainable_parameters', '?')} trained "
        f"parameters, {record['num_classes']} classes, {record['preprocessing']['image_size']}x"
        f"{record['preprocessing']['image_size']} input.",
        "",
        f"- data: {data.get('name', 'not recorded')}",
        f"- test accuracy: {f'{100 * accuracy:.2f} %' if isinstance(accuracy, (int, float)) else 'not recorded'}",
        f"- prompt: `{json.dumps(record['prompt'], sort_keys=True)}`",
        "",
        "```python",
        "import vptune",
        f'model = vptune.load_task("hf://{repo}")  # checks the record, the weights and the backbone',
        "```",
        "",
    ]
    return "\n".join(lines)


def upload(
    files: list[Path],
    card: str,
    repo: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    message: str = "vptune task",
) -> str:
    """Upload ``files`` and the model card ``card`` (as ``README.md``) to a Hub model repository, creating it if
    needed; returns the commit's URL."""
    hub = _hub()
    api = hub.HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token or os.environ.get("HF_TOKEN"))
    api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as staging:
        for file in files:
            shutil.copyfile(file, Path(staging) / file.name)
        (Path(staging) / "README.md").write_text(card)
        commit = api.upload_folder(
            folder_path=staging, repo_id=repo, repo_type="model", revision=revision, commit_message=message
        )
    return str(commit.commit_url if hasattr(commit, "commit_url") else commit)
