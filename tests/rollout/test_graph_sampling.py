"""Sampling inside the decode CUDA graphs, exercised on the CPU: each "graph" is replayed by calling
the captured function again (FakeGraph), so the static buffers, bucket padding, the lazily captured
sampler variants and the device-side column counter run as they do on the GPU. Given the same
logits, the graph's sampling IS the eager sampler, bit for bit. The graphed engine gives the eager
engine's tokens, and its log-probs up to float rounding: the graph's forward runs at the bucket's
padded shape over full-width block tables, which rounds the logits differently. A steady decode
step (same rows, no block table changed) writes nothing into the static buffers and runs no op
outside its two replays."""
from types import SimpleNamespace

import pytest
import torch
from rollout_helpers import load_ours, prompt
from torch.utils._python_dispatch import TorchDispatchMode

from rlpt_fast.rollout import Engine, Request, SamplingParams, cuda_graphs
from rlpt_fast.rollout.sampler import RowParams, pack_samples


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: replay() calls the captured function again and writes
    its output into the tensor the capture returned (the graph's static output)."""
    replaying = False

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        FakeGraph.replaying = True
        try:
            new = self.fn()
            if self.out is not None:
                self.out.copy_(new)
        finally:
            FakeGraph.replaying = False


def fake_record(self, fn):
    out = fn()
    return FakeGraph(fn, out), out


@pytest.fixture
def fake_graphs(monkeypatch):
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "_record", fake_record)


@pytest.fixture(scope="module")
def model(ckpt25):
    return load_ours(ckpt25)


def requests(cfg):
    return [Request(*prompt(cfg, 21, [7])), Request(*prompt(cfg, 22, [3, 4], [[1, 4, 4]])),
            Request(*prompt(cfg, 23, [12]))]


KW = dict(block_size=4, max_num_seqs=8, max_model_len=64, attention_backend="torch", cascade_decode=False)
GREEDY = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
CASES = {
    "greedy": [GREEDY] * 3,
    "temperature": [SamplingParams(n=2, temperature=0.7, max_tokens=8, seed=1, ignore_eos=True)] * 3,
    "top-k-top-p": [SamplingParams(n=3, temperature=0.9, top_k=5, top_p=0.8, max_tokens=6, seed=2)] * 3,
    # greedy and sampled rows in one batch; one request stops early, so later steps use a smaller bucket
    "mixed": [GREEDY, SamplingParams(n=3, max_tokens=9, seed=3, ignore_eos=True),
              SamplingParams(n=2, temperature=1.2, top_p=0.9, max_tokens=4, seed=4, ignore_eos=True)],
}


def run(model, params, **kw):
    engine = Engine(model, **{**KW, **kw})
    return engine, engine.generate(requests(model.config), params)


def assert_same(got, want, atol=1e-5):
    assert [[c.token_ids for c in o] for o in got] == [[c.token_ids for c in o] for o in want]
    for a, b in zip(got, want):
        for x, y in zip(a, b):  # the logits differ by rounding (module docstring); a wrong uniform,
            # temperature or filter moves a log-prob by far more than this
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=atol, rtol=0)
    assert [[c.finish_reason for c in o] for o in got] == [[c.finish_reason for c in o] for o in want]


@pytest.mark.parametrize("case", list(CASES))
def test_graphed_engine_equals_eager_engine(model, fake_graphs, case):
    _, want = run(model, CASES[case])
    engine, got = run(model, CASES[case], cuda_graphs=True)
    assert_same(got, want)
    graphs = engine.runner.graphs
    assert graphs.buckets == [1, 2, 4, 8]
    # the first decode step's code path: (greedy, sampled, scaled, filtered)
    flags = {"greedy": (True, False, False, False), "temperature": (False, True, True, False),
             "top-k-top-p": (False, True, True, True), "mixed": (True, True, True, True)}[case]
    assert flags in {f for _, f in graphs.samplers}
    if case == "mixed":  # the batch shrank from 6 rows to 4 when the n=2 request finished: two buckets
        assert {b for b, _ in graphs.samplers} >= {4, 8}


def test_recipe_and_greedy_paths_are_captured_with_the_forward_graphs(model, fake_graphs):
    engine = Engine(model, **KW, cuda_graphs=True)
    graphs = engine.runner.graphs
    assert set(graphs.samplers) == {(b, f) for b in graphs.buckets for f in cuda_graphs.PRECAPTURED}
    sampled = [SamplingParams(n=3, max_tokens=5, seed=1, ignore_eos=True), SamplingParams(n=2, max_tokens=3, seed=1)]
    engine.generate(requests(model.config), [*sampled, sampled[0]])
    engine.generate(requests(model.config), GREEDY)
    assert len(graphs.samplers) == len(graphs.buckets) * 2  # the recipe's rollouts, greedy: no capture mid-run


def test_graphed_engine_equals_eager_under_preemption(model, fake_graphs):
    params = [SamplingParams(n=3, max_tokens=12, seed=5, ignore_eos=True), GREEDY,
              SamplingParams(n=2, temperature=0.8, top_k=8, max_tokens=10, seed=6, ignore_eos=True)]
    small = dict(num_blocks=14, max_num_batched_tokens=16)
    eager, want = run(model, params, **small)
    graphed, got = run(model, params, cuda_graphs=True, **small)
    assert eager.stats["preemptions"] > 0 and graphed.stats["preemptions"] == eager.stats["preemptions"]
    assert_same(got, want)


@pytest.mark.parametrize("rows", [
    [(0.0, 0, 1.0, 1, 0)] * 3,                                                       # greedy
    [(1.0, 0, 1.0, 1, i) for i in range(5)],                                         # sampled, temperature 1
    [(0.0, 0, 1.0, 1, 0), (0.6, 0, 1.0, 2, 0), (1.0, 0, 1.0, 2, 1)],                 # greedy + scaled
    [(0.0, 0, 1.0, 1, 0), (0.9, 40, 1.0, 3, 0), (1.0, 0, 0.7, 3, 1), (1.0, 0, 1.0, 3, 2), (1.3, 3, 0.5, 4, 0)],
], ids=["greedy", "sampled", "greedy+scaled", "filtered+mixed"])
@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: sampler_triton in the graph
def test_graph_sampler_is_the_eager_sampler_bit_for_bit(model, fake_graphs, rows, backend):
    """The same logits (a vocabulary of thousands, so the top-p tail rounds as on a real one) and
    the same rows: the graph's tokens and log-probs equal the backend's eager sampler's at every
    step, across the end of the uniform table, in a bucket larger than the batch."""
    engine = Engine(model, **{**KW, "max_num_seqs": 16, "attention_backend": backend}, cuda_graphs=True)
    graphs = engine.runner.graphs
    b, vocab = len(rows), 3000
    bucket = next(x for x in graphs.buckets if x >= b)
    graphs.outputs[bucket] = torch.empty(bucket, vocab)  # the forward's static logits, here set by hand
    graphs.graphs[bucket] = SimpleNamespace(replay=lambda: None)
    rp, ref = RowParams.from_rows(rows, "cpu"), RowParams.from_rows(rows, "cpu")
    gen = torch.Generator().manual_seed(len(rows))
    for step in range(70):  # past AHEAD = 64: the table is remade once
        logits = torch.randn(b, vocab, generator=gen) * 3
        graphs.outputs[bucket][:b] = logits
        graphs.outputs[bucket][b:] = torch.randn(bucket - b, vocab, generator=gen)
        positions = [20 + step + i for i in range(b)]
        got = graphs.run(torch.zeros(4, b, dtype=torch.long), torch.zeros(b, 1, dtype=torch.int32), None, rp, positions)
        assert torch.equal(got, pack_samples(*engine.runner.backend.sample(logits, ref.at(positions)))), step
    assert graphs.temperature[b:].eq(1).all() and graphs.uniforms[b:].eq(0.5).all()  # harmless padding rows


class BufferWrites(TorchDispatchMode):
    """Records every op outside a (fake) replay that writes into the given tensors' storage."""

    def __init__(self, buffers):
        super().__init__()
        self.ptrs = {t.untyped_storage().data_ptr() for t in buffers}
        self.writes: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not FakeGraph.replaying and func._schema.is_mutable:
            for arg, value in zip(func._schema.arguments, [*args, *kwargs.values()]):
                written = arg.alias_info is not None and arg.alias_info.is_write
                if written and isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in self.ptrs:
                    self.writes.append(str(func))
        return func(*args, **kwargs)


def test_steady_decode_step_writes_nothing_into_the_static_buffers(model, fake_graphs, monkeypatch):
    """Outside the replays, a steady step (same rows, no block table changed) writes neither the
    sampling buffers nor the static inputs: the sampler graph advanced them."""
    engine = Engine(model, **KW, cuda_graphs=True)
    graphs = engine.runner.graphs
    sampling = [graphs.temperature, graphs.top_k, graphs.top_p, graphs.uniforms, graphs.column]
    inputs = [graphs.ids, graphs.positions, graphs.slots, graphs.lens, graphs.tables, graphs.live]
    steps = []  # per decode step: (sampling writes, input writes, a block table changed)
    real_run = cuda_graphs.DecodeGraphs.run

    def watched_run(self, *args):
        with BufferWrites(sampling) as s, BufferWrites(inputs) as i:
            out = real_run(self, *args)
        steps.append((s.writes, i.writes, engine.runner._tables_changed))
        return out

    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "run", watched_run)
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_tokens=12, seed=7, ignore_eos=True)
    got = engine.generate(requests(model.config)[:2], params)
    # all 6 rows decode together from the first decode step to the last (same max_tokens)
    assert len(steps) == 11 and all(len(c.token_ids) == 12 for o in got for c in o)
    assert steps[0][0] and steps[0][1], "the first decode step loads the rows"
    assert [s for s, _, _ in steps[1:]] == [[]] * 10
    changed = [c for _, _, c in steps[1:]]
    assert 0 < sum(changed) < 10  # rows cross into new blocks (block size 4) on some steps only
    assert all(bool(w) == c for _, w, c in steps[1:]), steps
    want = Engine(model, **KW).generate(requests(model.config)[:2], params)
    assert_same(got, want)


def test_cuda_graphs_on_the_cpu_is_refused_by_name(model):
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device; it is on cpu"):
        Engine(model, **KW, cuda_graphs=True)


def test_a_graphed_call_that_raises_mid_decode_leaves_the_next_call_exact(model, fake_graphs, monkeypatch):
    """A decode step that fails after loading the sampling buffers and before the replays (the
    device's column counter not advanced, the host's next_column already moved on): the next
    call samples what a fresh engine samples."""
    engine = Engine(model, **KW, cuda_graphs=True)
    params = CASES["top-k-top-p"]
    real_load = cuda_graphs.DecodeGraphs._load_sampling
    loads = []

    def failing_load(self, *args):
        real_load(self, *args)
        loads.append(1)
        if len(loads) == 3:
            raise RuntimeError("injected fault in a decode step")

    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "_load_sampling", failing_load)
    with pytest.raises(RuntimeError, match="injected fault"):
        engine.generate(requests(model.config), params)
    assert engine.runner.graphs.next_column is not None  # the failed step's host state is stale
    got = engine.generate(requests(model.config), params)
    want = Engine(model, **KW, cuda_graphs=True).generate(requests(model.config), params)
    assert [[c.token_ids for c in o] for o in got] == [[c.token_ids for c in o] for o in want]
    assert [[c.logprobs for c in o] for o in got] == [[c.logprobs for c in o] for o in want]


@pytest.mark.gpu
def test_real_cuda_graphs_sample_as_the_eager_gpu_path(ckpt25):
    """On the GPU: sampler graphs really captured (three code paths, two buckets) give the eager
    path's tokens, and its log-probs to the forward's rounding; a second call replays the same."""
    from rlpt_fast import load_model

    gpu = load_model(ckpt25, dtype=torch.float32, device="cuda")
    reqs = requests(gpu.config)
    kw = dict(block_size=16, max_num_seqs=16, max_model_len=128, num_blocks=128)
    eager = Engine(gpu, cuda_graphs=False, **kw)
    graphed = Engine(gpu, **kw)
    assert graphed.runner.graphs is not None
    for params in CASES.values():
        want = eager.generate(reqs, params)
        got = graphed.generate(reqs, params)
        assert_same(got, want, atol=1e-4)  # the forward's shapes (bucket, split counts) differ
        assert [[c.token_ids for c in o] for o in graphed.generate(reqs, params)] == \
               [[c.token_ids for c in o] for o in got]
    assert len({f for _, f in graphed.runner.graphs.samplers}) >= 3


class Launches(TorchDispatchMode):
    """Counts the ops (kernel launches on a GPU) run outside the (fake) replays; views are free."""
    VIEWS = frozenset({"view", "slice", "select", "expand", "squeeze", "unsqueeze", "alias", "as_strided", "t"})

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not FakeGraph.replaying and func.__name__.split(".")[0] not in self.VIEWS:
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_steady_decode_step_launches_nothing_outside_the_replays(model, fake_graphs, monkeypatch):
    from rlpt_fast.rollout import model_runner

    engine = Engine(model, **KW, cuda_graphs=True)
    steps = []  # per decode step: (ops outside the replays, a block table changed)
    real_run = model_runner.ModelRunner.run

    def counted_run(self, batch):
        if batch.is_prefill:
            return real_run(self, batch)
        with Launches() as mode:
            out = real_run(self, batch)
        steps.append((mode.ops, self._tables_changed))
        return out

    monkeypatch.setattr(model_runner.ModelRunner, "run", counted_run)
    engine.generate(requests(model.config)[:2], SamplingParams(n=3, max_tokens=12, seed=7, ignore_eos=True))
    steady = [ops for ops, changed in steps[1:] if not changed]
    assert len(steady) >= 5 and steady == [[]] * len(steady), steps  # (on a GPU: the host copy of the samples)
    assert all(ops for ops, changed in steps[1:] if changed)  # a table change reloads the inputs
