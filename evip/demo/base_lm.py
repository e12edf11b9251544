"""The demo's base LLM: a small plain InternLM2 pre-trained on CPU from bundled text, with its own BPE tokenizer.

EViP starts from a pre-trained LLM whose language ability the frozen stages must leave untouched; the demo
needs one that exists on every machine without downloads. The corpus is CPython's bundled documentation text
(``pydoc_data.topics``, ~465k characters shipped with every Python, ~375k once sections repeated across topics
are dropped) plus the caller's sentences (the demo's scene descriptions), and a share of chat conversations
rendered with the ``internlm2-chat`` template, so later stages start from an LM that already knows
``<|im_start|>user ... <|im_end|>``. Every 20th documentation piece (and every 20th extra text) is held out for
perplexity and never trained on, not even by the tokenizer.

Training is plain PyTorch: packed fixed-length sequences, AdamW, warmup + cosine LR, a fixed number of steps
(reproducible bit for bit under a seed and thread count). The result is an HF folder (``config.json``,
``model.safetensors``, tokenizer files) that ``MonoInternVL.from_llm`` and ``load_tokenizer`` read, plus
``base_lm.json``: the fingerprint (config + corpus hash), the measured figures and the loss curve. The folder is
built in a temporary sibling and renamed into place with the marker already inside, so a folder with a
matching marker is a finished build and a second ``make demo`` reuses it.

Legend: B sequences per step, L tokens per sequence, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = ["BaseLM", "BaseLMConfig", "BaseLMCorpus", "build_base_lm", "build_corpus", "documentation_text",
           "perplexity"]

FORMAT_VERSION = 1
"""Bumped whenever corpus building or training changes what a given config produces (invalidates caches)."""
MARKER = "base_lm.json"
"""Written last, inside the build folder before it is renamed into place: its presence means a finished build."""
TEMPLATE = "internlm2-chat"
_HELD_OUT_EVERY = 20  # every 20th piece / extra text is held out (5%)


@dataclass(frozen=True)
class BaseLMConfig:
    """Sizes, corpus mixture and optimisation of the base LM. Every field except `num_threads` and `log_every`
    enters the cache fingerprint."""

    vocab_size: int = 2048
    """BPE vocabulary (`<s> </s> <pad>` included); the 2 chat and 9 Mono special tokens are added after it."""
    hidden_size: int = 128
    """Model width D."""
    intermediate_size: int = 352
    """SwiGLU width F (~2.75 D)."""
    num_hidden_layers: int = 3
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads H (head dim D / H)."""
    num_key_value_heads: int = 2
    """KV heads (GQA: H / K queries share each)."""
    max_position_embeddings: int = 1024
    """Context of the saved model: later stages add ~16 visual tokens per tile, up to several tiles, plus text."""
    rope_theta: float = 10000.0
    """RoPE base."""
    seq_len: int = 256
    """Tokens per packed training sequence L (and the perplexity window)."""
    batch_size: int = 4
    """Sequences per step B (small: on 2 CPU cores more updates beat bigger batches at equal tokens)."""
    steps: int = 1000
    """Optimizer steps (fixed, so the result is reproducible): about 2 minutes on 2 idle CPU cores."""
    max_seconds: Optional[float] = None
    """Optional wall-clock cap: stop early after this many seconds of training (then not reproducible)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of `lr`."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW decay on matrices (norm weights are not decayed)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    chat_share: float = 0.2
    """Share of training tokens from chat conversations (upsampled from the available pairs)."""
    system_message: str = "You are a helpful assistant."
    """System message of the rendered conversations; pass the same one to `MonoInternVL.from_llm`."""
    piece_chars: int = 1500
    """Documentation topics are cut at paragraph boundaries into pieces of about this many characters."""
    max_doc_chars: Optional[int] = None
    """Use only the first pieces of the documentation, up to about this many characters (shortened runs)."""
    seed: int = 0
    """Seeds the tokenizer-independent parts: initialisation, data order, conversation grouping."""
    num_threads: Optional[int] = None
    """Torch intra-op threads while training (default: the CPUs this process may use)."""
    log_every: int = 50
    """Print one progress line every this many steps."""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "batch_size", "steps", "piece_chars",
                    "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"BaseLMConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.vocab_size < 300:
            raise ValueError(
                f"BaseLMConfig.vocab_size must be >= 300 (256 byte symbols + merges), got {self.vocab_size}"
            )
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"BaseLMConfig.num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                f"({self.hidden_size}) and be a multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 2 <= self.seq_len <= self.max_position_embeddings:
            raise ValueError(
                f"BaseLMConfig.seq_len must be in [2, max_position_embeddings={self.max_position_embeddings}], "
                f"got {self.seq_len}"
            )
        if not 0.0 <= self.chat_share < 1.0:
            raise ValueError(f"BaseLMConfig.chat_share must be in [0, 1), got {self.chat_share}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.warmup_steps < 0:
            raise ValueError(
                f"BaseLMConfig: lr must be > 0 (got {self.lr}), min_lr_ratio in [0, 1] (got {self.min_lr_ratio}), "
                f"warmup_steps >= 0 (got {self.warmup_steps})"
            )
        if self.max_doc_chars is not None and self.max_doc_chars < 20 * self.piece_chars:
            raise ValueError(
                f"BaseLMConfig.max_doc_chars must be None or >= 20 * piece_chars ({20 * self.piece_chars}) so that "
                f"some documentation is held out, got {self.max_doc_chars}"
            )
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"BaseLMConfig.max_seconds must be positive or None, got {self.max_seconds}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"BaseLMConfig.num_threads must be positive or None, got {self.num_threads}")


@dataclass(frozen=True)
class BaseLMCorpus:
    """The text of one build, split once: what is trained on and what is held out."""

    train_texts: tuple[str, ...]
    """Documentation pieces and the caller's extra texts that are trained on."""
    conversations: tuple[str, ...]
    """Rendered chat conversations (template text, without BOS), upsampled to `chat_share` of the tokens."""
    held_out_texts: tuple[str, ...]
    """Held-out documentation pieces: the perplexity set."""
    held_out_extra: tuple[str, ...]
    """Held-out extra texts (the caller's own domain), also never trained on."""
    digest: str
    """sha256 of the raw inputs (documentation text, extra texts, chat pairs)."""


@dataclass(frozen=True)
class BaseLM:
    """A finished base LM: where it is, what was held out, and what was measured when it was built."""

    folder: Path
    """HF folder: `config.json`, `model.safetensors`, tokenizer files and `base_lm.json`."""
    held_out_texts: tuple[str, ...]
    """Documentation pieces never trained on (evaluate with `perplexity(..., seq_len=seq_len)`)."""
    held_out_extra: tuple[str, ...]
    """The caller's extra texts that were held out."""
    system_message: str
    """System message the conversations were rendered with (template `internlm2-chat`)."""
    seq_len: int
    """Training sequence length, also the perplexity window the figures used."""
    steps: int
    """Optimizer steps taken."""
    seconds: float
    """Wall seconds of the training loop (tokenizer and corpus preparation excluded)."""
    build_seconds: float
    """Wall seconds of the whole build (corpus, tokenizer, training, evaluation, saving)."""
    train_loss: float
    """Mean training loss over the last 10% of the steps."""
    initial_perplexity: float
    """Held-out perplexity of the freshly initialised model."""
    held_out_perplexity: float
    """Held-out perplexity after training."""
    held_out_bits_per_char: float
    """The same held-out loss in bits per character (comparable across vocabularies)."""
    losses: tuple[float, ...]
    """Training loss at every step."""
    cached: bool
    """True when this call found the build in `folder` and did not train."""


def documentation_text() -> list[str]:
    """CPython's bundled documentation topics (``pydoc_data.topics``), in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _pieces(text: str, max_chars: int, seen: set[str]) -> list[str]:
    """Cut `text` at blank lines into consecutive pieces of at most ~`max_chars` characters (longer paragraphs
    stay whole); the held-out split works on pieces so it samples the whole documentation evenly.

    Paragraphs of 40+ characters already in `seen` are dropped (and new ones added): several topics repeat
    whole sections of others, and a held-out paragraph must not be trained on through its copy elsewhere.
    """
    out, current = [], ""
    for para in text.split("\n\n"):
        key = para.strip()
        if len(key) >= 40:
            if key in seen:
                continue
            seen.add(key)
        if current and len(current) + len(para) + 2 > max_chars:
            out.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current.strip():
        out.append(current)
    return out


_HEADING = re.compile(r"^(\S[^\n]{2,70})\n([*=\-~^]{3,})\n\n(.+?)(?:\n\n|\Z)", re.M | re.S)
_QUESTIONS = ("What is {}?", "Tell me about {}.", "Explain {}.", "What does the documentation say about {}?",
              "Can you describe {}?")


def _doc_pairs(pieces: Sequence[str], rng: random.Random) -> list[tuple[str, str]]:
    """Question/answer pairs from reST section headings in the trained pieces: the answer is the first
    paragraph under the heading, cut after a sentence near 300 characters. They teach the chat format when the
    caller brings no pairs, and keep Python prose inside conversations when it does."""
    pairs = []
    for piece in pieces:
        for match in _HEADING.finditer(piece):
            heading, underline, body = match.groups()
            if len(underline) != len(heading) or body.startswith((" ", "*")):
                continue  # not a heading (underline of another length), or a code block / list under it
            answer = " ".join(body.split())
            if len(answer) > 300:
                cut = answer.find(". ", 200)
                answer = answer[: cut + 1] if 0 <= cut < 400 else answer[:300]
            topic = heading.strip()
            topic = "the" + topic[3:] if topic.startswith("The ") else topic  # "What is the "with" statement?"
            pairs.append((rng.choice(_QUESTIONS).format(topic), answer))
    return pairs


def _conversations(pairs: Sequence[tuple[str, str]], rng: random.Random, system_message: str) -> list[str]:
    """Group `pairs` (shuffled) into conversations of 1-3 turns rendered with the internlm2-chat template."""
    from mono.templates import get_template

    template = get_template(TEMPLATE)
    order = list(pairs)
    rng.shuffle(order)
    out, i = [], 0
    while i < len(order):
        n = rng.randint(1, 3)
        messages = [m for q, a in order[i : i + n] for m in (("user", q), ("assistant", a))]
        out.append(template.render(messages, system_message=system_message, add_generation_prompt=False))
        i += n
    return out


def build_corpus(
    config: BaseLMConfig, extra_texts: Sequence[str] = (), chat_pairs: Sequence[tuple[str, str]] = ()
) -> BaseLMCorpus:
    """Split the documentation and `extra_texts` into trained and held-out text; render the conversations from
    `chat_pairs` (the caller's) and from section headings of the trained documentation."""
    docs = documentation_text()
    extra = [str(t) for t in extra_texts]
    pairs = [(str(q), str(a)) for q, a in chat_pairs]
    raw = json.dumps([docs, extra, pairs], ensure_ascii=False).encode()
    seen: set[str] = set()
    pieces = [p for topic in docs for p in _pieces(topic, config.piece_chars, seen)]
    if config.max_doc_chars is not None:
        ends = [0]
        for piece in pieces:
            ends.append(ends[-1] + len(piece))
        pieces = pieces[: next((i for i, end in enumerate(ends) if end >= config.max_doc_chars), len(pieces))]
    # Held out at a fixed stride (not seeded): every seed and config is evaluated on the same text.
    mid = _HELD_OUT_EVERY // 2
    held = [p for i, p in enumerate(pieces) if i % _HELD_OUT_EVERY == mid]
    trained = [p for i, p in enumerate(pieces) if i % _HELD_OUT_EVERY != mid]
    held_extra = [t for i, t in enumerate(extra) if i % _HELD_OUT_EVERY == mid]
    held_set = set(held_extra)  # a repeated sentence must not be trained on through its copy either
    trained_extra = [t for i, t in enumerate(extra) if i % _HELD_OUT_EVERY != mid and t not in held_set]
    rng = random.Random(config.seed)
    doc_pairs = _doc_pairs(trained, rng)
    # Caller pairs and documentation pairs form separate conversations: a scene question followed by one about
    # Python's grammar would teach nothing the stages use.
    conversations = _conversations(pairs, rng, config.system_message) + _conversations(
        doc_pairs, rng, config.system_message
    )
    return BaseLMCorpus(
        train_texts=tuple(trained + trained_extra),
        conversations=tuple(conversations),
        held_out_texts=tuple(held),
        held_out_extra=tuple(held_extra),
        digest=hashlib.sha256(raw).hexdigest(),
    )


def _fingerprint(config: BaseLMConfig, corpus: BaseLMCorpus) -> str:
    fields = dataclasses.asdict(config)
    for name in ("num_threads", "log_every"):  # they change neither the data nor (by design) the weights' recipe
        fields.pop(name)
    payload = {"format": FORMAT_VERSION, "config": fields, "corpus": corpus.digest}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _train_tokenizer(config: BaseLMConfig, corpus: BaseLMCorpus):
    from mono.tokenization import train_bpe_tokenizer

    # The chat markers become special tokens after training; left in the text they would only waste merges.
    chats = [c.replace("<|im_start|>", "\n").replace("<|im_end|>", "\n") for c in corpus.conversations]
    return train_bpe_tokenizer(list(corpus.train_texts) + chats, vocab_size=config.vocab_size)


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """BOS + tokens + EOS per text (BOS comes from the tokenizer's post-processor, as InternLM2's does)."""
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    return [ids + [eos] for ids in tokenizer(list(texts))["input_ids"]]


def _token_chunks(config: BaseLMConfig, plain: list[list[int]], chats: list[list[int]]) -> torch.Tensor:
    """``(steps * B, L)`` training sequences: epochs of shuffled documents (all plain texts, plus conversations
    cycled until they make `chat_share` of the epoch's tokens) packed end to end, cut into L-token chunks, and the
    chunks shuffled so a step does not see L-token windows of one document side by side."""
    rng = random.Random(config.seed + 1)
    plain_tokens = sum(len(d) for d in plain)
    chat_budget = int(plain_tokens * config.chat_share / (1.0 - config.chat_share)) if chats else 0
    needed = config.steps * config.batch_size * config.seq_len
    stream: list[int] = []
    chat_order: list[int] = []
    while len(stream) < needed:
        epoch = list(plain)
        taken = 0
        while taken < chat_budget:
            if not chat_order:
                chat_order = list(range(len(chats)))
                rng.shuffle(chat_order)
            conv = chats[chat_order.pop()]
            epoch.append(conv)
            taken += len(conv)
        rng.shuffle(epoch)
        for doc in epoch:
            stream.extend(doc)
    num_chunks = len(stream) // config.seq_len
    chunks = torch.tensor(stream[: num_chunks * config.seq_len], dtype=torch.long).view(num_chunks, config.seq_len)
    order = torch.randperm(num_chunks, generator=torch.Generator().manual_seed(config.seed + 2))
    return chunks[order[: config.steps * config.batch_size]]


def _lr_at(config: BaseLMConfig, step: int) -> float:
    """Linear warmup to `lr`, then cosine down to `lr * min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def _model_config(config: BaseLMConfig, tokenizer):
    from mono.configuration import PLAIN_LLM_ARCHITECTURE, InternLM2Config

    return InternLM2Config(
        architectures=[PLAIN_LLM_ARCHITECTURE], vocab_size=len(tokenizer), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_theta,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _train(
    config: BaseLMConfig, model, chunks_NL: torch.Tensor, log: Callable[[str], None]
) -> tuple[list[float], float]:
    """Run the optimizer loop on `chunks_NL` (B rows per step); return per-step losses and the loop's seconds."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    model.train()
    losses: list[float] = []
    tokens_per_step = config.batch_size * config.seq_len
    start = time.perf_counter()
    for step in range(config.steps):
        lr = _lr_at(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_BL = chunks_NL[step * config.batch_size : (step + 1) * config.batch_size]
        loss = model(input_ids=batch_BL, labels=batch_BL).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"base LM training diverged: loss {losses[-1]} at step {step}; lower BaseLMConfig.lr")
        elapsed = time.perf_counter() - start
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            eta = elapsed / done * (config.steps - done)
            log(f"base-lm step {done}/{config.steps} loss {losses[-1]:.4f} lr {lr:.2e} "
                f"grad-norm {float(grad_norm):.2f} tok/s {done * tokens_per_step / elapsed:.0f} eta {eta:.0f}s")
        if config.max_seconds is not None and elapsed >= config.max_seconds and done < config.steps:
            log(f"base-lm stopping at step {done}/{config.steps}: max_seconds={config.max_seconds} reached")
            break
    model.eval()
    return losses, time.perf_counter() - start


def _load_for_eval(folder: Path):
    """A saved plain InternLM2 folder or a Mono-InternVL folder, in fp32 (chosen by config.json's model_type)."""
    from mono.internlm2 import InternLM2ForCausalLM
    from mono.modeling import MonoInternVL

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} holds no config.json; pass a saved model folder or a model")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    cls = InternLM2ForCausalLM if model_type == "internlm2" else MonoInternVL
    return cls.from_pretrained(str(folder), dtype=torch.float32)


def perplexity(
    model_or_folder: Union[torch.nn.Module, str, os.PathLike],
    tokenizer=None,
    texts: Sequence[str] = (),
    seq_len: int = 256,
    batch_size: int = 8,
    num_threads: int = 1,
) -> float:
    """Exact fp32 perplexity ``exp(mean next-token NLL)`` of a plain InternLM2 or a Mono-InternVL on `texts`.

    Input is text only, so a Mono model runs its text expert on every token: for the same decoder weights it
    computes the same operations as the plain LM, and the two figures are bit-identical (the demo's check that
    S1.1/S1.2 leave the language model untouched). The CPU kernels split their sums by thread, so the last bits
    depend on the thread count: the evaluation runs with `num_threads` (then restores the caller's count), which
    makes the figure a function of the weights and the text alone. A folder is loaded in fp32 (with its
    tokenizer when `tokenizer` is None); a model must already be fp32. Its train/eval mode is restored.

    Raises:
        ValueError: a model with non-fp32 parameters, `seq_len` < 2, or no text of at least two tokens.
    """
    if isinstance(model_or_folder, torch.nn.Module):
        model = model_or_folder
    else:
        folder = Path(model_or_folder)
        model = _load_for_eval(folder)
        if tokenizer is None:
            from mono.tokenization import load_tokenizer

            tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise ValueError("perplexity needs the tokenizer when given a model object")
    total, count = _nll(model, tokenizer, texts, seq_len, batch_size, num_threads)
    return math.exp(total / count)


def _nll(model, tokenizer, texts: Sequence[str], seq_len: int, batch_size: int = 8, num_threads: int = 1):
    """:func:`evip.eval.text_nll` (the one implementation of the windows and exact sums) with ``num_threads``
    threads: the CPU kernels split sums by thread, so a fixed count makes the figure a function of the weights."""
    from evip.eval import text_nll

    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return text_nll(model, tokenizer, texts, seq_len, batch_size=batch_size)
    finally:
        torch.set_num_threads(threads)


def _usable_cpus() -> int:
    # The CPUs this process may run on (a container's or taskset's limit), where the platform tells.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _pid_alive(pid: str) -> bool:
    """Whether the build that named a temporary folder after its process id is still running (then it is
    left alone: two demos started side by side must not delete each other's work)."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return int(pid) != os.getpid()  # our own id: a leftover of an earlier build in this process


def _read_marker(folder: Path) -> dict:
    """The finished build's record, or {} where there is none (no folder, no marker, or an unreadable one)."""
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _result(folder: Path, record: dict, corpus: BaseLMCorpus, cached: bool) -> BaseLM:
    figures = record["figures"]
    return BaseLM(
        folder=folder, held_out_texts=corpus.held_out_texts, held_out_extra=corpus.held_out_extra,
        system_message=record["config"]["system_message"], seq_len=record["config"]["seq_len"],
        steps=figures["steps"], seconds=figures["seconds"], build_seconds=figures["build_seconds"],
        train_loss=figures["train_loss"], initial_perplexity=figures["initial_perplexity"],
        held_out_perplexity=figures["held_out_perplexity"], held_out_bits_per_char=figures["held_out_bits_per_char"],
        losses=tuple(record["losses"]), cached=cached,
    )


def build_base_lm(
    out_dir: Union[str, os.PathLike],
    config: BaseLMConfig = BaseLMConfig(),
    extra_texts: Sequence[str] = (),
    chat_pairs: Sequence[tuple[str, str]] = (),
    log: Callable[[str], None] = print,
) -> BaseLM:
    """Pre-train the base LM into `out_dir` (an HF folder), or return the finished build already there.

    `extra_texts` are added to the documentation text (every 20th is held out); `chat_pairs` are
    ``(question, answer)`` pairs grouped into internlm2-chat conversations (documentation headings give more).
    A folder whose `base_lm.json` records the same fingerprint (config + inputs) is returned without training;
    anything else at `out_dir` is replaced. Load the result with ``MonoInternVL.from_llm(folder,
    tokenizer=load_tokenizer(folder), system_message=result.system_message)``.
    """
    from mono.internlm2 import InternLM2ForCausalLM

    begin = time.perf_counter()
    out_dir = Path(out_dir)
    corpus = build_corpus(config, extra_texts, chat_pairs)
    fingerprint = _fingerprint(config, corpus)
    record = _read_marker(out_dir)
    if record.get("fingerprint") == fingerprint and (out_dir / "model.safetensors").is_file():
        log(f"base-lm: reusing {out_dir} (fingerprint {fingerprint[:12]})")
        return _result(out_dir, record, corpus, cached=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build; never mistaken for a finished one
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(config.num_threads or _usable_cpus())
        tokenizer = _train_tokenizer(config, corpus)
        plain, chats = _encode(tokenizer, corpus.train_texts), _encode(tokenizer, corpus.conversations)
        chunks_NL = _token_chunks(config, plain, chats)
        chat_tokens = sum(len(c) for c in chats)
        log(f"base-lm: {sum(len(d) for d in plain)} text tokens in {len(plain)} texts, {len(chats)} conversations "
            f"({chat_tokens} tokens, upsampled to {config.chat_share:.0%}), {len(corpus.held_out_texts)} held-out "
            f"pieces; vocab {len(tokenizer)}; {config.steps} steps x {config.batch_size} x {config.seq_len} tokens")
        # fork_rng: seeding for a reproducible init must not disturb the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = InternLM2ForCausalLM(_model_config(config, tokenizer)).float()
        total, count = _nll(model, tokenizer, corpus.held_out_texts, config.seq_len)
        initial_ppl = math.exp(total / count)
        losses, seconds = _train(config, model, chunks_NL, log)
        # With perplexity()'s defaults: the recorded figure is what `perplexity(folder, ...)` returns later.
        total, count = _nll(model, tokenizer, corpus.held_out_texts, config.seq_len)
        num_chars = sum(len(t) for t in corpus.held_out_texts)
        tail = losses[-max(1, len(losses) // 10) :]
        figures = {
            "steps": len(losses), "seconds": round(seconds, 2), "train_loss": sum(tail) / len(tail),
            "initial_perplexity": initial_ppl, "held_out_perplexity": math.exp(total / count),
            "held_out_bits_per_char": total / num_chars / math.log(2), "held_out_tokens": count,
            "held_out_chars": num_chars, "train_threads": torch.get_num_threads(),
        }
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        figures["build_seconds"] = round(time.perf_counter() - begin, 2)
        record = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "config": dataclasses.asdict(config),
                  "template": TEMPLATE, "corpus_sha256": corpus.digest, "torch": torch.__version__,
                  "figures": figures, "losses": losses}
        (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        # The folder appears under its name only complete; a crash between these two lines leaves no folder.
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads_before)
    log(f"base-lm: {figures['steps']} steps in {figures['seconds']:.1f}s, train loss {figures['train_loss']:.3f}, "
        f"held-out perplexity {initial_ppl:.1f} -> {figures['held_out_perplexity']:.2f} "
        f"({figures['held_out_bits_per_char']:.3f} bits/char); saved {out_dir}")
    return _result(out_dir, record, corpus, cached=False)
