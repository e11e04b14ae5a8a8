"""A squeezed corpus on disk: built once, loaded by any later process (``SqueezedEngine.save_corpus`` /
``load_corpus``).

A saved corpus is a folder:

- ``corpus.json``: the format and its version, the documents (text and metadata), the token ids, the documents'
  spans, the template header, the configuration, the build time, the questions' running statistics, the
  calibration's scalars, and the model the corpus was built with (what a loading engine must match);
- ``layer_000.safetensors`` ...: one file per layer (keys, values, cluster offsets, centroids, ...), written and
  read one at a time, so that a corpus held on a GPU never sits in host memory whole;
- ``calibration.safetensors``: the calibration's two score distributions (sorted per-key scores, weights, head
  ids, level-1 parent scores), the probe's per-document baseline and the head probe's misses.

A save is written into a temporary folder beside the target and swapped into place (one atomic exchange on Linux,
else two renames), so an interrupted save never leaves a half-written corpus where a complete one was. This module
reads and writes; what a loading engine must check (its model and tokenizer) is the engine's job.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .calibration import Calibration, ScoreDistribution
from .config import SqueezeConfig
from .corpus import CorpusLayer, SqueezedCorpus
from .prompting import CorpusDocument

FORMAT = "sqz-corpus"
VERSION = 1
META_FILE = "corpus.json"
CALIBRATION_FILE = "calibration.safetensors"
_DISTRIBUTIONS = ("decode", "prefill")
_MODEL_KEYS = ("model_type", "num_hidden_layers", "kv_heads", "head_dim", "kv_dtype", "model_name")
_META_KEYS = ("model", "name", "documents", "token_ids", "doc_spans", "header_text", "config", "build_seconds", "reads",
              "layers", "calibration")


def layer_file(i: int) -> str:
    return f"layer_{i:03d}.safetensors"


def save(corpus: SqueezedCorpus, path: str | os.PathLike, model: dict, overwrite: bool = False) -> Path:
    """Write ``corpus`` to the folder ``path`` (created, with its parents). ``model``: what a loading
    engine must match (JSON values). An existing folder is replaced only with ``overwrite``, and only once the
    new save is complete. Returns the folder."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    if target.exists() and not (target / META_FILE).is_file():
        raise FileExistsError(f"{target} exists and is not a saved corpus (no {META_FILE}); not replacing it")
    meta = _meta(corpus, model)  # every JSON check before a byte is written
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's folder is private (0700); the saved folder is an ordinary one
        for i, layer in enumerate(corpus.layers):
            save_file({k: v.detach().contiguous().cpu() for k, v in layer.tensors().items()}, str(tmp / layer_file(i)))
        save_file(_calibration_tensors(corpus), str(tmp / CALIBRATION_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
        if target.exists() and _exchange(tmp, target):  # one atomic swap: the old save is in tmp now
            shutil.rmtree(tmp, ignore_errors=True)
        elif target.exists():  # two renames (no atomic swap here): the old save goes only after the new one is whole
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            try:
                os.replace(target, old / target.name)
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(old / target.name, target)  # the previous save back in its place
                    raise
            finally:  # also when the first rename failed: its empty folder goes
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


_RENAME_EXCHANGE = 2  # renameat2's flag (linux/fs.h)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so that no moment leaves ``b``
    missing. False where the system or the filesystem has no such call (the caller then renames twice)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28, musl)
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # an old kernel, or a filesystem that cannot swap
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def read_meta(path: str | os.PathLike) -> dict:
    """The ``corpus.json`` of a saved corpus, checked for its format and version."""
    folder = Path(path).expanduser()
    file = folder / META_FILE
    if not file.is_file():
        what = "does not exist" if not folder.exists() else f"has no {META_FILE}: not a saved corpus"
        # a save that renames twice (no atomic swap) and was killed between them: the previous save is still whole
        pattern = f".{folder.name}.old-*/{folder.name}/{META_FILE}"
        left = sorted(str(p.parent) for p in folder.absolute().parent.glob(pattern))
        if left and not folder.exists():
            what += f"; an interrupted save_corpus left the previous save in {left[-1]} (move it back to load it)"
        raise FileNotFoundError(f"{folder} {what}")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}): the save is damaged") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{file} is not a saved squeezed corpus")
    if meta.get("version") != VERSION:
        raise ValueError(f"{folder} was saved in format version {meta.get('version')}; this sqz-integrations reads "
                         f"version {VERSION}")
    missing = [key for key in _META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(missing)}: the save is damaged")
    problem = _structure_problem(meta)
    if problem:
        raise ValueError(f"{file}: {problem}: the save is damaged")
    return meta


def _structure_problem(meta: dict) -> str | None:
    """What in a corpus.json's nested parts is not as a save writes it (None: nothing): the loaders index into them."""
    model, reads = meta["model"], meta["reads"]
    if not isinstance(model, dict) or any(k not in model for k in _MODEL_KEYS):
        return f"'model' needs {', '.join(_MODEL_KEYS)}"
    if not isinstance(meta["documents"], list) or not all(
            isinstance(d, dict) and isinstance(d.get("text"), str) and isinstance(d.get("metadata"), dict)
            for d in meta["documents"]):
        return "every entry of 'documents' needs a 'text' string and a 'metadata' object"
    if not isinstance(reads, dict) or "kept" not in reads or "reads" not in reads:
        return "'reads' needs 'kept' and 'reads'"
    if not isinstance(meta["layers"], list) or len(meta["layers"]) != model["num_hidden_layers"]:
        return f"'layers' has {len(meta['layers'])} entries for a {model['num_hidden_layers']}-layer model"
    if not isinstance(meta["calibration"], dict):
        return "'calibration' is not an object"
    return None


def documents(meta: dict) -> list[CorpusDocument]:
    """The saved documents of a :func:`read_meta`."""
    return [CorpusDocument(d["text"], d["metadata"]) for d in meta["documents"]]


def load(path: str | os.PathLike, meta: dict, device: torch.device, name: str) -> SqueezedCorpus:
    """The corpus saved at ``path`` (``meta``: its :func:`read_meta`), its tensors on ``device``, named ``name``."""
    folder = Path(path).expanduser()
    try:
        config = SqueezeConfig(**meta["config"])
    except TypeError as e:
        raise ValueError(f"{folder}: its configuration does not fit this sqz-integrations ({e})") from e
    layers = []
    for i, n_always in enumerate(meta["layers"]):
        tensors = _read(folder / layer_file(i), device)
        try:
            layers.append(CorpusLayer(**tensors, n_always=n_always))
        except TypeError as e:
            raise ValueError(f"{folder / layer_file(i)} does not hold a corpus layer ({e})") from e
    extra = _read(folder / CALIBRATION_FILE, torch.device("cpu"))
    corpus = SqueezedCorpus(
        name=name,
        documents=documents(meta),
        token_ids=list(meta["token_ids"]),
        doc_spans=[tuple(s) for s in meta["doc_spans"]],
        header_text=meta["header_text"],
        layers=layers,
        calibration=_calibration(meta["calibration"], extra, layers, folder),
        config=config,
        build_seconds=meta["build_seconds"],
    )
    corpus.reads.kept, corpus.reads.reads = list(meta["reads"]["kept"]), list(meta["reads"]["reads"])
    corpus.source_baseline = extra.get("source_baseline")
    corpus.head_misses = extra.get("head_misses")
    return corpus


# ---------------------------------------------------------------------------------------------------- parts
def _meta(corpus: SqueezedCorpus, model: dict) -> dict:
    documents = []
    for i, doc in enumerate(corpus.documents):
        try:
            again = json.loads(json.dumps(doc.metadata, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise TypeError(f"document {i}'s metadata cannot be saved as JSON ({e}); give it str/number/list/dict "
                            "values") from e
        if again != doc.metadata:  # JSON would turn tuples into lists and keys into strings: it would load changed
            raise TypeError(f"document {i}'s metadata would not load back as it is from JSON ({doc.metadata!r} -> "
                            f"{again!r}); give it str keys and str/number/bool/None/list/dict values")
        documents.append({"text": doc.text, "metadata": doc.metadata})
    with corpus.reads.lock:
        reads = {"kept": list(corpus.reads.kept), "reads": list(corpus.reads.reads)}
    from . import __version__

    return {
        "format": FORMAT,
        "version": VERSION,
        "sqz_integrations": __version__,
        "model": model,
        "name": corpus.name,
        "documents": documents,
        "token_ids": list(corpus.token_ids),
        "doc_spans": [list(s) for s in corpus.doc_spans],
        "header_text": corpus.header_text,
        "config": dataclasses.asdict(corpus.config),
        "build_seconds": corpus.build_seconds,
        "reads": reads,
        "layers": [layer.n_always for layer in corpus.layers],
        "calibration": corpus.calibration.scalars(),
    }


def _calibration_tensors(corpus: SqueezedCorpus) -> dict[str, torch.Tensor]:
    out = {}
    for kind in _DISTRIBUTIONS:  # scored now if no question has needed them yet
        dist: ScoreDistribution = getattr(corpus.calibration, kind)
        for field, t in (("scores", dist.scores), ("weights", dist.weights), ("heads", dist.heads),
                         ("parent", dist.parent)):
            if t is not None:
                out[f"{kind}.{field}"] = t.contiguous().cpu()
    for field in ("source_baseline", "head_misses"):
        t = getattr(corpus, field)
        if t is not None:
            out[field] = t.contiguous().cpu()
    return out


def _calibration(scalars: dict, tensors: dict[str, torch.Tensor], layers: list[CorpusLayer],
                 folder: Path) -> Calibration:
    dists = {}
    for kind in _DISTRIBUTIONS:
        if f"{kind}.scores" not in tensors:
            raise ValueError(f"the saved calibration has no {kind} distribution: the save is damaged")
        dists[kind] = ScoreDistribution.from_sorted(
            tensors[f"{kind}.scores"], tensors[f"{kind}.weights"], tensors[f"{kind}.heads"], tensors.get(f"{kind}.parent")
        )
    try:
        return Calibration.from_state(scalars, dists, layers)
    except KeyError as e:
        raise ValueError(f"{folder}: the saved calibration lacks {e}: the save is damaged") from e


def _read(file: Path, device: torch.device) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: the save is incomplete")
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} cannot be read ({e}): the save is damaged") from e
