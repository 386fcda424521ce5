"""Running a model one decoder block at a time, straight from its weight files.

Why: calibration runs the calibration text through the model, and holding the whole model
for it (float32: 4 bytes a parameter, ~32 GB for an 8 B model) is more than most machines
have. Run block by block, the model costs what its largest block takes, plus the hidden
states of the calibration sequences: the vocabulary matrices (2 GiB each in float32 for an
8 B model) are never held whole (eoq.calibrate.streamed_vocab).

How (the layer-by-layer scheme of GPTQ's and AutoAWQ's calibration):
  1. The model is built with accelerate's ``init_empty_weights``: parameters on the meta
     device (nothing allocated), buffers real (rotary frequencies are computed at
     construction; checkpoints do not store them). The modules outside the blocks are read
     from the files (float32) when they run (a forward pre-hook) and dropped again when the
     pass that ran them ends (``outside()``): the embeddings live through the capture, the
     final norm and head through the tail, never both. A large embedding or bias-free head
     is not read whole at all: its forward is replaced by one that reads, from the file's
     memory map, the rows its tokens select (the embedding) or row chunks (the head), and
     the Fisher pass takes their gradients by those rows (eoq.calibrate.streamed_vocab).
  2. The blocks are the ModuleList of same-class modules holding most of the parameters
     (``model.layers``, GPT-2's ``h``, BERT's ``encoder.layer``).
  3. Capture: the first block is replaced by a module that records its call (the hidden
     states and every other argument: masks, position embeddings...) and stops the forward
     pass. One pass per calibration sequence, batch 1 as in
     ``calibration.collect_stats``. The hidden states are kept: sequences x tokens x hidden
     float32 (32 x 512 x 4096 x 4 B = 256 MiB for an 8 B model).
  4. Each block in turn: its parameters read from the files, every sequence's hidden states
     run through it with the recorded arguments (``on_block`` wraps that run: the statistics
     hooks), the outputs replace the inputs, its parameters dropped (back to meta).
  5. The tail: the blocks are replaced by a replay that hands out the last block's outputs,
     and the model's own forward pass runs the final norm and the head on them. The modules
     that ran in the capture (the embeddings) run again there, and what they give is thrown
     away by the replay: they get placeholder weights (zeros broadcast to the shape, no
     memory; a streamed embedding returns zeros) instead of a second read.

Memory: before anything is read, ``check_calibration_memory`` estimates what the run will
hold (``calibration_memory``: by part, from the model's shapes and the calibration's token
counts, erring high) and raises a MemoryError naming the need and the budget (MemAvailable,
or EOQ_MEMORY_BUDGET) when it does not fit.

Which inputs: every block sees the float model's activations (the float blocks before it),
as a whole-model forward pass gives them: the same operations on the same values, so the
statistics equal ``collect_stats`` on the loaded model bit for bit (tests/test_blockwise.py).
Feeding the already-quantized blocks' outputs instead (GPTQ's "sequential" mode) would tie
the statistics to one quantization setting; eoq's are reused across settings.

Traps:
  * ``use_cache=False``: a cache would keep every block's keys and values.
  * A block returns a tensor (transformers 5) or a tuple whose first item is the hidden
    states; the replay returns what the block returned, so the model unpacks it as usual.
  * A tied pair (embedding and head) is read under both names, each when its module runs:
    the price of not touching the model's tying logic is a second read, not a second copy.
  * A module outside the blocks whose weight another module uses without calling it would
    see a meta tensor: the capture checks that the first block's input is real (after the
    blocks, a meta tensor fails at the first real operation on it).
  * The attention implementation is the one ``from_pretrained`` picks (sdpa where
    available); a module built by hand would default to another and differ in the last bits.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from typing import Callable, Optional

import torch

BlockHook = Callable[[str, torch.nn.Module], contextlib.AbstractContextManager]


class NoBlocks(ValueError):
    """The model has no list of repeated blocks to run one at a time."""


class _Stop(Exception):
    """Raised by the capture module: the forward pass has given what it had to."""


class _Capture(torch.nn.Module):
    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        raise _Stop


class _Replay(torch.nn.Module):
    """Block 0 hands out the stored output of the current sequence; the others pass it on."""

    def __init__(self, outputs: Optional[list], wrap: bool, current: list):
        super().__init__()
        self.outputs, self.wrap, self.current = outputs, wrap, current

    def forward(self, hidden, *args, **kwargs):
        h = hidden if self.outputs is None else self.outputs[self.current[0]]
        return (h,) if self.wrap else h


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, ModuleList) of the model's repeated blocks: the ModuleList of modules
    of one class that holds the most parameters. NoBlocks (a ValueError) when there is none."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise NoBlocks(f"{type(model).__name__}: no list of repeated blocks found; block-by-block calibration "
                       f"needs one (model.layers, h, encoder.layer...)")
    return best


class BlockRunner:
    """A model built empty, whose blocks are read from a FolderSource one at a time."""

    def __init__(self, source, dtype: torch.dtype = torch.float32, scratch: Optional[os.PathLike] = None):
        from accelerate import init_empty_weights

        from ..format.sources import model_class

        self.source, self.dtype = source, dtype
        self.scratch = scratch  # where the Fisher pass keeps block inputs (None: the system's temp dir)
        self.pool: Optional[dict[str, torch.Tensor]] = None  # block tensors' reused buffers (_cast_into), when a dict
        config = source.config
        with init_empty_weights(include_buffers=False):
            model = model_class(config)(config)
        # from_pretrained's attention implementation, not the constructor's default
        model.set_attn_implementation(_default_attention(model))
        self.model = model.eval()
        self.blocks_name, self.blocks = find_blocks(model)
        self.prefix = self.blocks_name + "."
        self._wrap = False  # whether a block returns a tuple (known once one has run)
        # parameters that are one in the model (a tied embedding and head), by first name:
        # they are read as separate copies, and the Fisher pass adds their gradients up again
        # (an empty model is not tied yet: the source's tie map says which are)
        order = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        group = {n: n for n in order}
        for name, target in source.tied.items():
            if name in group and target in group:
                group[name] = group[target]
        shared: dict[str, list[str]] = {}
        for n in order:
            shared.setdefault(group[n], []).append(n)
        self.tied = {names[0]: names for names in shared.values() if len(names) > 1}
        # The modules outside the blocks holding tensors of their own, read when they run.
        self.grad_outside = False  # whether what is read requires grad (the Fisher pass)
        self._loaded: dict[str, torch.nn.Module] = {}
        self._placeholders: set[str] = set()  # modules given placeholder weights in the tail
        self._before: set[str] = set()  # modules that ran before the blocks (in the capture)
        self._placeholding = False
        self._capturing = False
        self._own: dict[str, list[str]] = {}  # module -> its tensors read from the files
        files = self._files = frozenset(source.names)
        # Large vocabulary matrices run from their file (eoq.calibrate.streamed_vocab), never read whole:
        # a bias-free head in row chunks (``on_head_grad`` takes its weight gradient chunk by
        # chunk, the Fisher pass), an embedding by the rows its tokens select (``embedding_grads``).
        from .streamed_vocab import embedding_to_stream, head_to_stream

        self.head = head_to_stream(model, files)
        self.on_head_grad = None
        self._stored: dict[str, torch.Tensor] = {}  # streamed module -> its file's tensor, for one pass
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # embedding -> (rows, table)
        if self.head is not None:
            model.get_submodule(self.head).forward = self._head_forward
        self.embeddings = [n for n, m in model.named_modules() if not n.startswith(self.prefix)
                           and n != self.head and embedding_to_stream(m) and f"{n}.weight" in files]
        for name in self.embeddings:
            model.get_submodule(name).forward = self._embedding_forward(name)
        streamed = set(self.embeddings) | {self.head}
        for name, module in model.named_modules():
            if name == self.blocks_name or name.startswith(self.prefix) or name in streamed:
                continue
            own = [n for n, _ in module.named_parameters(recurse=False)]
            own += [n for n, _ in module.named_buffers(recurse=False) if _join(name, n) in files]
            if own:
                self._own[name] = own
                module.register_forward_pre_hook(self._materialise_hook(name, own))

    def _materialise_hook(self, name: str, own: list[str]):
        """A forward pre-hook reading the module's own tensors when it runs (module docstring)."""
        def hook(module, args):
            if name in self._loaded:
                return
            if self._placeholding and name in self._before:
                self._placeholders.add(name)
                self._placeholder(module, own)
            else:
                self._load_own(module, name, own)
                if self._capturing:
                    self._before.add(name)
            self._loaded[name] = module
        return hook

    def _load_own(self, module: torch.nn.Module, name: str, own: list[str]) -> None:
        self._read(module, _join(name, ""), own, pool=None)
        for p in module.parameters(recurse=False):
            p.requires_grad_(self.grad_outside and p.is_floating_point())

    @staticmethod
    def _placeholder(module: torch.nn.Module, own: list[str]) -> None:
        """Zeros of each tensor's shape, broadcast from one value: no memory, no read."""
        from accelerate.utils import set_module_tensor_to_device

        for n in own:
            t = getattr(module, n)
            set_module_tensor_to_device(module, n, "cpu", value=torch.zeros((), dtype=t.dtype).expand(t.shape))

    def _stored_weight(self, name: str) -> torch.Tensor:
        """The file's tensor of a streamed module (a memory map), kept until the pass ends."""
        if name not in self._stored:
            self._stored[name] = self.source.get(f"{name}.weight")
        return self._stored[name]

    def _head_forward(self, x: torch.Tensor) -> torch.Tensor:
        from .streamed_vocab import head_logits

        return head_logits(x, self._stored_weight(self.head), self.on_head_grad, self.dtype)

    def _embedding_forward(self, name: str):
        from .streamed_vocab import embedding_rows

        module = self.model.get_submodule(name)

        def forward(ids: torch.Tensor) -> torch.Tensor:
            if self._placeholding and name in self._before:  # the tail: thrown away, nothing read
                return torch.zeros(*ids.shape, module.embedding_dim, dtype=self.dtype)
            if self._capturing:
                self._before.add(name)
            rows, table, out = embedding_rows(ids, self._stored_weight(name), module.padding_idx, self.dtype,
                                              self.grad_outside and torch.is_grad_enabled())
            self._tables[name] = (rows, table)
            return out
        return forward

    def embedding_grads(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """{weight name: (rows, their values, their gradient)} of the streamed embeddings' last
        lookups that have a gradient (taken: a second call gives nothing until the next)."""
        out = {}
        for name, (rows, table) in list(self._tables.items()):
            if table.grad is not None:
                out[f"{name}.weight"] = (rows, table.detach(), table.grad)
                del self._tables[name]
        return out

    def loaded_parameter(self, name: str) -> Optional[torch.nn.Parameter]:
        """Parameter `name` outside the blocks as read from the files, while its module is
        loaded (not a placeholder); else None."""
        module_name, _, attr = name.rpartition(".")
        if module_name not in self._loaded or module_name in self._placeholders:
            return None
        return self._loaded[module_name]._parameters.get(attr)

    @contextlib.contextmanager
    def outside(self):
        """While inside, the modules outside the blocks that run are read (once); on leaving
        they are dropped back to the meta device."""
        from accelerate.utils import set_module_tensor_to_device

        try:
            yield
        finally:
            for name, module in self._loaded.items():
                for n in self._own[name]:
                    set_module_tensor_to_device(module, n, "meta")
            streamed = bool(self._stored or self._tables)
            self._loaded.clear()
            self._placeholders.clear()
            self._stored.clear()
            self._tables.clear()
            # A pass's graphs end in reference cycles (autograd nodes and their hooks) that can
            # hold a streamed matrix, a memory map whose touched pages (1 GiB for an 8 B model's
            # head) would stay resident until the collector ran by chance. Only then: a full
            # collection costs ~70 ms with transformers loaded, and sampling leaves this context
            # twice a token (a tiny model's 128 tokens spent 19 s of 22 in it).
            if streamed:
                gc.collect()

    def _load(self, module: torch.nn.Module, prefix: str) -> None:
        """Read every parameter (and stored buffer) of block `module` from the files, in self.dtype."""
        tensors = [n for n, _ in module.named_parameters(remove_duplicate=False)]
        tensors += [n for n, _ in module.named_buffers(remove_duplicate=False) if prefix + n in self._files]
        self._read(module, prefix, tensors, pool=self.pool)

    def _read(self, module: torch.nn.Module, prefix: str, tensors: list[str],
              pool: Optional[dict[str, torch.Tensor]]) -> None:
        """Module tensors ``tensors`` (names in ``module``, ``prefix`` + name in the files) read
        and placed, floating ones in self.dtype (into ``pool``'s buffers when given)."""
        from accelerate.utils import set_module_tensor_to_device

        for n in tensors:
            full = prefix + n
            if full not in self._files:
                raise ValueError(f"{self.source.name}: the model has parameter {full!r} and the weight files do not")
            t = self.source.get(full)
            if t.is_floating_point():
                t = t.to(self.dtype) if pool is None else _cast_into(pool, n, t, self.dtype)
            set_module_tensor_to_device(module, n, "cpu", value=t)

    def block_name(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def capture(self, sequences: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
        """The first block's call (args, kwargs) for each sequence, the model's own forward pass
        stopped there. Under grad mode the hidden states keep their graph back to the
        embeddings. Call it inside ``outside()``."""
        return [self.capture_call(input_ids=ids.reshape(1, -1), use_cache=False) for ids in sequences]

    def capture_call(self, **model_kwargs) -> tuple[tuple, dict]:
        """The first block's call (args, kwargs) in ``model(**model_kwargs)``, stopped there."""
        model, blocks = self.model, self.blocks
        calls: list = []
        first = blocks[0]
        blocks[0] = _Capture(calls)
        self._capturing = True
        try:
            try:
                model(**model_kwargs)
            except _Stop:
                pass
            else:
                raise RuntimeError(f"{type(model).__name__}: the forward pass never reached {self.blocks_name}[0]")
        finally:
            blocks[0] = first
            self._capturing = False
        (args, kwargs), = calls
        if args[0].is_meta:
            raise RuntimeError(f"{type(model).__name__}: the first block's input was computed from a weight that "
                               f"was never read (a module outside the blocks used without being called)")
        return args, kwargs

    def load_block(self, i: int) -> torch.nn.Module:
        block = self.blocks[i]
        self._load(block, self.block_name(i) + ".")
        return block

    def drop_block(self, i: int) -> None:
        self.blocks[i].to("meta")
        # What a block's run freed is glibc's to reuse, and it keeps it: tensors of a few MiB
        # (one sequence's activations) come from its heap, whose free chunks it hands back only
        # when trimmed. Untrimmed, the statistics pass over a 4-layer folder of 8 B shapes left
        # 0.85 GiB of them held (BENCHMARKS.md), and more blocks left more.
        release_freed_memory()

    def block_forward(self, block, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
        """One block on one sequence's hidden states, with that sequence's recorded arguments."""
        args, kwargs = call
        out = block(hidden, *args[1:], **kwargs)
        self._wrap = isinstance(out, tuple)
        return out[0] if self._wrap else out

    @contextlib.contextmanager
    def tail(self, outputs: list[torch.Tensor]):
        """While inside, the blocks are a replay: the model's forward pass on sequence k (call
        ``model(input_ids=...)`` with ``current[0] = k``) runs what comes after the blocks on
        outputs[k]. Yields ``current``. Use it inside ``outside()``, after a capture there: the
        modules the capture ran get placeholders (module docstring)."""
        blocks, current = self.blocks, [0]
        saved = list(blocks)
        for i in range(len(blocks)):
            blocks[i] = _Replay(outputs if i == 0 else None, self._wrap, current)
        self._placeholding = True
        try:
            yield current
        finally:
            self._placeholding = False
            for i, b in enumerate(saved):
                blocks[i] = b

    @torch.no_grad()
    def run(self, sequences: list[torch.Tensor], on_block: Optional[BlockHook] = None,
            on_rest: Optional[Callable[[torch.nn.Module], contextlib.AbstractContextManager]] = None,
            progress: bool = False) -> None:
        """Every sequence (1-D LongTensor) through the model, block by block. ``on_block(name,
        block)`` is entered around each block's run (name: the block's qualified name);
        ``on_rest(model)`` around the two passes of the whole model (capture and tail), where
        only the modules outside the blocks run."""
        from tqdm.auto import tqdm

        with self.outside(), on_rest(self.model) if on_rest else contextlib.nullcontext():
            calls = self.capture(sequences)
        hidden = [args[0] for args, _ in calls]
        for i in tqdm(range(len(self.blocks)), desc="calibration blocks", unit="block", disable=not progress):
            block = self.load_block(i)
            try:
                with on_block(self.block_name(i), block) if on_block else contextlib.nullcontext():
                    for k, call in enumerate(calls):
                        hidden[k] = self.block_forward(block, hidden[k], call)
            finally:
                self.drop_block(i)
        with self.outside(), self.tail(hidden) as current, \
                on_rest(self.model) if on_rest else contextlib.nullcontext():
            for k, ids in enumerate(sequences):
                current[0] = k
                self.model(input_ids=ids.reshape(1, -1), use_cache=False)


# The interpreter with torch and transformers imported, measured ~0.6-0.9 GiB anonymous
# memory here: 1 GiB keeps the estimate on the high side.
PROCESS_BYTES = 1 << 30
MEMORY_ENV = "EOQ_MEMORY_BUDGET"  # bytes calibration may use (suffix K/M/G/T allowed); default MemAvailable


def _cast_into(pool: dict[str, torch.Tensor], n: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, copied into pool's buffer for block tensor n (blocks alike reuse one set of
    buffers: a pass that reads every block many times, eoq.calibrate.sampling_blockwise, would otherwise
    map fresh memory and fault its pages in at every read)."""
    buf = pool.get(n)
    if buf is None or buf.shape != t.shape or buf.dtype != dtype:
        buf = pool[n] = torch.empty(t.shape, dtype=dtype)
    return buf.copy_(t)


def memory_budget() -> Optional[tuple[int, str]]:
    """(bytes, where that figure comes from), or None where it cannot be known."""
    env = os.environ.get(MEMORY_ENV)
    if env:
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        text = env.strip().upper().removesuffix("B")
        try:
            value = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
        except ValueError:
            raise ValueError(f"{MEMORY_ENV}={env!r}: expected a number of bytes (suffix K, M, G or T allowed)") from None
        return int(value), MEMORY_ENV
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    return None


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).
    A pass over a model frees many tensors of a few MiB, which glibc serves from its heap
    (below its dynamic mmap threshold, up to 32 MiB) and keeps after they are freed: what
    comes after calibration would otherwise start with that much resident for nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, or None; looked up once (find_library runs ldconfig: ~3 ms a call,
    and the heap is trimmed after every block of every pass)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return getattr(libc, "malloc_trim", None)
    except OSError:
        return None


def calibration_memory(config, tokens: int, seq_len: int, fisher_tokens: int, covariance: bool,
                       cache_tokens: int = 0) -> dict[str, int]:
    """What calibrating block by block holds at its peak, in bytes, by part (an estimate from
    the model's shapes, meant to err high; BENCHMARKS.md has it against measured peaks): the
    modules outside the blocks that are read whole (not the streamed vocabulary matrices,
    eoq.calibrate.streamed_vocab) in float32, all but the second largest (the embedding and the head
    run in different passes, BlockRunner.outside), the largest one's gradient in the Fisher
    pass, the largest block with its gradients, the hidden states of the calibration sequences,
    one block's stored inputs in the Fisher pass (eoq.calibrate.stored_inputs keeps the others on disk),
    one sequence's working set inside a block and at the head, with ``cache_tokens`` sampled
    (eoq.calibrate.sampling_blockwise) their key/value cache and one step's logits, and, with error
    feedback, the input covariances of one block (eoq.calibrate.covariance_store keeps the others on disk)
    and of the Linears outside the blocks (float64)."""
    from ..format.sources import model_class

    with torch.device("meta"):
        model = model_class(config)(config)
    blocks_name, blocks = find_blocks(model)
    from .streamed_vocab import embedding_to_stream, head_to_stream

    weights = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    streamed = {head_to_stream(model, weights)} | {n for n, m in model.named_modules() if embedding_to_stream(m)}
    modules = sorted((sum(p.numel() for p in m.parameters(recurse=False)) for n, m in model.named_modules()
                      if n != blocks_name and not n.startswith(blocks_name + ".") and n not in streamed),
                     reverse=True) + [0, 0]
    held = sum(modules) - modules[1]  # never the embedding and the head at once
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 1)
    inner = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
    vocab = int(getattr(config, "vocab_size", 0) or 1)
    need = {
        "the process itself (torch, transformers)": PROCESS_BYTES,
        "modules outside the blocks read whole, one vocabulary matrix at a time (float32)": 4 * held,
        "the largest one's gradient in the Fisher pass": 4 * modules[0] if fisher_tokens else 0,
        "the largest block and its gradients (float32)": 8 * block,
        "hidden states of the calibration sequences": 2 * 4 * tokens * hidden,
        "the Fisher pass's stored inputs of one block (the rest on disk)": 4 * fisher_tokens * hidden,
        "one sequence inside a block and at the head": 4 * seq_len * (4 * inner + 8 * hidden + heads * seq_len
                                                                          + 3 * vocab),
    }
    if cache_tokens:
        kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
        head_dim = int(getattr(config, "head_dim", 0) or hidden // heads)
        need["the sampled text's key/value cache and one step's logits (float32)"] = 4 * (
            2 * len(blocks) * cache_tokens * kv_heads * head_dim + 3 * cache_tokens * vocab // max(1, seq_len))
    if covariance:  # at most one n x n matrix per Linear (inputs shared by several count once in fact)
        def cov(modules):
            return sum(8 * m.in_features ** 2 for m in modules if isinstance(m, torch.nn.Linear))

        inside = {id(m) for b in blocks for m in b.modules()}
        need["input covariances for error feedback: one block's (the others on disk) and those outside the "
             "blocks (float64)"] = max(cov(b.modules()) for b in blocks) + cov(
            m for m in model.modules() if id(m) not in inside)
    return need


def check_calibration_memory(name: str, config, tokens: int, seq_len: int, fisher_tokens: int,
                             covariance: bool, cache_tokens: int = 0) -> None:
    """A MemoryError naming the need and the budget when calibration would not fit, before it
    starts (a run killed by the kernel an hour in tells the user nothing)."""
    budget = memory_budget()
    if budget is None:
        return
    need = calibration_memory(config, tokens, seq_len, fisher_tokens, covariance, cache_tokens)
    total = sum(need.values())
    if total <= budget[0]:
        return
    gib = 1 << 30
    parts = "; ".join(f"{k} {v / gib:.2f} GiB" for k, v in need.items())
    raise MemoryError(f"{name}: calibration needs about {total / gib:.2f} GiB ({parts}) and the budget is "
                      f"{budget[0] / gib:.2f} GiB ({budget[1]}; set {MEMORY_ENV} to change it). Use fewer or "
                      f"shorter calibration sequences (calib_sequences, calib_seq_len, sensitivity_sequences)"
                      + (", or convert without error feedback" if covariance else "") + ".")


def _default_attention(model) -> str:
    """What from_pretrained would pick: sdpa when the model supports it, else eager."""
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


__all__ = ["BlockRunner", "NoBlocks", "find_blocks", "calibration_memory", "check_calibration_memory", "memory_budget"]
