"""The saliency GRU op (kernels/gru.py, kernels/gru_triton.py) against nn.GRU read at each sample's length.

Inputs are fresh random each run (``fresh_seed`` prints the seed); the steps past a sample's length hold
noise, so reading past steps[b] shows. On CPU the Triton kernel runs in the interpreter (conftest sets
TRITON_INTERPRET=1 before triton is imported), in fp32: the interpreter computes bf16 wrong.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")

from kernels import KernelInputError  # noqa: E402
from kernels import gru_triton  # noqa: E402
from kernels.gru import GRU_OP, gru_last_state, input_projection  # noqa: E402
from kernels.gru_triton import gru_recurrence_triton, gru_settings, max_batch_per_launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.usefixtures("strict_fp32")


def make_gru(d: int, dtype=torch.float32) -> nn.GRU:
    g = nn.GRU(d, d, num_layers=1, batch_first=True).to(DEVICE)
    with torch.no_grad():
        for p in g.parameters():  # wider than the default init, so the gates leave their linear range
            p.uniform_(-1.5 / d**0.5, 1.5 / d**0.5)
    return g.requires_grad_(False).to(dtype)


def weights(g: nn.GRU, dtype=None):
    ps = (g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0)
    return tuple(p.to(dtype) for p in ps) if dtype is not None else ps


def make_steps(b: int, length: int, padded: bool) -> torch.Tensor:
    if not padded:
        return torch.full((b,), length, dtype=torch.int64, device=DEVICE)
    steps = torch.randint(1, length + 1, (b,), device=DEVICE)
    steps[0] = length  # the longest sample has the padded length; the others are shorter or equal
    if b > 2:
        steps[-1] = 1
    return steps


def reference(g: nn.GRU, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """nn.GRU over the padded batch, read at index steps[b] - 1 (what reference/heads.py does)."""
    with torch.no_grad():
        out, _ = g(x)
    return out[torch.arange(x.shape[0], device=x.device), steps - 1]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def call(g, x, steps, backend="torch", dtype=None):
    w_ih, w_hh, b_ih, b_hh = weights(g, dtype)
    with torch.no_grad():
        return gru_last_state(x if dtype is None else x.to(dtype), w_ih, w_hh, b_ih, b_hh, steps, backend=backend)


# (B, L, d, padded): lengths 1, 2, 37, 75; odd d; batches with per-sample lengths
TORCH_SHAPES = [(1, 1, 24, False), (3, 2, 32, True), (5, 37, 24, True), (4, 75, 32, True), (2, 75, 256, True),
                (1, 75, 256, False), (7, 37, 40, True)]


@pytest.mark.parametrize("b,length,d,padded", TORCH_SHAPES)
def test_torch_loop_matches_nn_gru(fresh_seed, b, length, d, padded):
    g = make_gru(d)
    x = torch.randn(b, length, d, device=DEVICE)
    steps = make_steps(b, length, padded)
    y = call(g, x, steps, "torch")
    ref = reference(g, x, steps)
    assert y.shape == (b, d) and y.dtype == torch.float32
    assert rel_err(y, ref) <= 1e-5
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [[37, 37, 20, 9, 9, 1], [37, 20, 9, 1], [37, 36], [37], [1, 1]])
def test_prefix_loop_fp32_matches_nn_gru(fresh_seed, lengths):
    """The Python prefix loop in fp32, rows sorted by length as it expects: several samples active (addmm),
    a single one (the batched per-gate GEMV: a tail of one, or B = 1), and the switch between them."""
    from kernels.gru import gru_recurrence_torch

    g = make_gru(40)
    x = torch.randn(len(lengths), 37, 40, device=DEVICE)
    steps = torch.tensor(lengths, device=DEVICE)
    w_ih, w_hh, b_ih, b_hh = weights(g)
    with torch.no_grad():
        y = gru_recurrence_torch(input_projection(x, w_ih, b_ih), w_hh, b_hh, steps.tolist())
    torch.testing.assert_close(y, reference(g, x, steps), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_major_layout_is_the_same_recurrence(fresh_seed, dtype):
    """gi laid out (L, B, 3H) (``step_major``, what the op's sparse input projection makes) gives exactly the
    state of the (B, L, 3H) layout, doubled n-third or not; and the op's step-major projection holds gi."""
    from kernels.gru import _read_rows_projection, _sigmoid_input, gru_recurrence_torch

    g = make_gru(40)
    x = torch.randn(4, 37, 40, device=DEVICE).to(dtype)
    x[1, 20:] = 0  # zero rows: the projection skips them
    lengths = [37, 30, 9, 1]
    w_ih, w_hh, b_ih, b_hh = (w.to(dtype) for w in weights(g))
    with torch.no_grad():
        gi = input_projection(x, w_ih, b_ih)
        y = gru_recurrence_torch(gi, w_hh, b_hh, lengths)
        y_sm = gru_recurrence_torch(gi.transpose(0, 1).contiguous(), w_hh, b_hh, lengths, step_major=True)
        wi2, bi2 = _sigmoid_input(w_ih, b_ih)
        gi2 = _read_rows_projection(x, wi2, bi2, lengths)  # (L, B, 3H), n-third doubled
        y_op = gru_recurrence_torch(gi2, w_hh, b_hh, lengths, n_doubled=True, step_major=True)
    assert gi2.shape == (37, 4, 120)
    torch.testing.assert_close(y_sm, y, rtol=0, atol=0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y_op, y, rtol=tol, atol=tol)
    for b, n in enumerate(lengths):  # the rows the loop reads, in their places: the full GEMM's (n-third doubled)
        full = input_projection(x[b:b + 1, :n], wi2, bi2)[0]
        torch.testing.assert_close(gi2[:n, b], full)  # (a GEMM over other rows may round differently)


@pytest.mark.parametrize("threads", [1, 2, 3, 5, 7])  # 3H = 120: 1, 2, 3, 5 column blocks; 7 does not divide: 3
def test_single_row_blocks_match_nn_gru_at_any_thread_count(fresh_seed, threads):
    """The single-active-sample W_hh product is split in one column block per thread: every split (and the
    fallback to the three gates) gives nn.GRU's state, for a lone sample and a one-sample tail."""
    from kernels.gru import _row_blocks, gru_recurrence_torch

    g = make_gru(40)
    x = torch.randn(2, 37, 40, device=DEVICE)
    steps = torch.tensor([37, 9], device=DEVICE)
    w_ih, w_hh, b_ih, b_hh = weights(g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _row_blocks(120) == (threads if threads != 7 else 3)
        with torch.no_grad():
            y = gru_recurrence_torch(input_projection(x, w_ih, b_ih), w_hh, b_hh, steps.tolist())
            y1 = gru_recurrence_torch(input_projection(x[:1], w_ih, b_ih), w_hh, b_hh, [37])
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(y, reference(g, x, steps), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y1, y[:1], rtol=1e-6, atol=1e-6)

def test_each_sample_uses_only_its_own_steps(fresh_seed):
    """A sample's state equals the same sample run alone on its first steps[b] steps (no batch leak)."""
    g = make_gru(32)
    x = torch.randn(5, 19, 32, device=DEVICE)
    steps = torch.tensor([19, 4, 11, 1, 11], device=DEVICE)
    y = call(g, x, steps)
    for i, n in enumerate(steps.tolist()):
        alone = call(g, x[i: i + 1, :n].contiguous(), steps[i: i + 1].clone().fill_(n))
        torch.testing.assert_close(y[i: i + 1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_loop_half_precision(fresh_seed, dtype):
    """bf16/fp16 inputs and weights (fp32 gates and state) vs the fp32 nn.GRU; the output is in x's dtype."""
    g = make_gru(64)
    x = torch.randn(6, 75, 64, device=DEVICE)
    steps = make_steps(6, 75, True)
    y = call(g, x, steps, "torch", dtype)
    assert y.dtype == dtype
    assert rel_err(y, reference(g, x, steps)) <= 1e-2


def test_bad_inputs_raise_one_line_errors():
    g = make_gru(16)
    w = weights(g)
    x = torch.randn(3, 5, 16, device=DEVICE)
    ok = torch.tensor([5, 2, 1], device=DEVICE)
    cases = [
        ((x, *w, torch.tensor([5, 0, 1], device=DEVICE)), r"steps\[1\] = 0 is outside \[1, 5\]"),
        ((x, *w, torch.tensor([5, 6, 1], device=DEVICE)), r"steps\[1\] = 6 is outside \[1, 5\]"),
        ((x, *w, ok.int()), "steps must be an int64 tensor of shape \\(3,\\)"),
        ((x, *w, ok[:2]), "steps must be an int64 tensor of shape \\(3,\\)"),
        ((x[0], *w, ok), "x must have 3 dims"),
        ((x.double(), *w, ok), "x dtype must be one of"),
        ((torch.randn(3, 5, 8, device=DEVICE), *w, ok), r"w_ih must have shape \(48, 8\)"),
        ((x, w[0], w[1][:, :8], w[2], w[3], ok), r"w_hh must be \(3H, H\)"),
        ((x, w[0], w[1], w[2][:16], w[3], ok), r"b_ih must have shape \(48,\)"),
        ((x, w[0].half(), *w[1:], ok), "w_ih is torch.float16"),
        ((x[:, :0], *w, ok), "at least one step"),
    ]
    for args, match in cases:
        for backend in ("torch", "triton"):
            with pytest.raises(KernelInputError, match=match) as info:
                with torch.no_grad():
                    gru_last_state(*args, backend=backend)
            assert "\n" not in str(info.value)
    with pytest.raises(KernelInputError, match="backend must be one of"):
        gru_last_state(x, *w, ok, backend="cuda")


def test_grad_required_raises():
    g = make_gru(16).requires_grad_(True)
    x = torch.randn(2, 4, 16, device=DEVICE)
    with pytest.raises(KernelInputError, match="inference-only"):
        gru_last_state(x, *weights(g), torch.tensor([4, 2], device=DEVICE))
    with torch.no_grad():  # fine without grad mode
        gru_last_state(x, *weights(g), torch.tensor([4, 2], device=DEVICE))


class TinyHead(nn.Module):
    """A module that calls the op as the fused model does: the nn.GRU's weights as its own parameters (dynamo
    refuses to trace a module that holds an nn.GRU), then one elementwise op."""

    def __init__(self, d: int, backend: str = "auto"):
        super().__init__()
        self.ref = [make_gru(d)]  # a list: not a submodule
        for name, p in zip(("w_ih", "w_hh", "b_ih", "b_hh"), weights(self.ref[0])):
            self.register_parameter(name, nn.Parameter(p.clone(), requires_grad=False))
        self.backend = backend

    @property
    def gru(self) -> nn.GRU:
        return self.ref[0]

    def forward(self, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        h = gru_last_state(x, self.w_ih, self.w_hh, self.b_ih, self.b_hh, steps, backend=self.backend)
        return h * 2.0


def count_op(gm: torch.fx.GraphModule) -> int:
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    return sum(t in (GRU_OP, torch.ops.ld_detr.gru_last_state) for t in targets)


def test_torch_compile_sees_one_op(fresh_seed):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    m = TinyHead(32, "torch")
    torch._dynamo.reset()
    run = torch.compile(m, fullgraph=True, backend=backend, dynamic=True)
    x = torch.randn(3, 11, 32, device=DEVICE)
    steps = torch.tensor([11, 3, 7], device=DEVICE)
    with torch.no_grad():
        y = run(x, steps)
        ref = reference(m.gru, x, steps) * 2.0
        y2 = run(torch.randn(2, 5, 32, device=DEVICE), torch.tensor([5, 1], device=DEVICE))  # new shapes
    assert y2.shape == (2, 32)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1 and count_op(graphs[0]) == 1
    calls = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert not [c for c in calls if any(k in c for k in ("addmm", "sigmoid", "tanh", "lerp", "aten.gru", "_VF"))]


def test_torch_export_sees_one_op(fresh_seed):
    m = TinyHead(24, "torch")
    x = torch.randn(3, 9, 24, device=DEVICE)
    steps = torch.tensor([9, 4, 1], device=DEVICE)
    b, t = torch.export.Dim("batch", min=1, max=256), torch.export.Dim("length", min=2, max=128)
    with torch.no_grad():
        ep = torch.export.export(m, (x, steps), dynamic_shapes=({0: b, 1: t}, {0: b}))
    assert count_op(ep.graph_module) == 1
    assert sum(n.op == "call_function" for n in ep.graph.nodes) == 2  # the op and the * 2.0
    x2 = torch.randn(5, 23, 24, device=DEVICE)
    s2 = torch.tensor([23, 1, 9, 17, 2], device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2, s2), reference(m.gru, x2, s2) * 2.0, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the Triton kernel (the interpreter on CPU: small shapes, fp32)
# ---------------------------------------------------------------------------------------------------------
TRITON_SHAPES = [(1, 1, 24, False), (3, 9, 32, True), (2, 2, 16, True), (1, 37, 24, False)]


@pytest.mark.parametrize("b,length,d,padded", TRITON_SHAPES)
def test_triton_default_mode_matches_nn_gru(fresh_seed, b, length, d, padded):
    """The default launch: on CPU the interpreter-safe mode (one program per sample), on CUDA the persistent one."""
    g = make_gru(d)
    x = torch.randn(b, length, d, device=DEVICE)
    steps = make_steps(b, length, padded)
    y = call(g, x, steps, "triton")
    ref = reference(g, x, steps)
    assert y.shape == (b, d) and y.dtype == torch.float32
    assert rel_err(y, ref) <= 1e-5
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def gpu_mode(block_b: int, d: int, groups: int) -> dict:
    """The persistent (barrier) mode with one slice per group: what the interpreter can run of it."""
    bd = triton.next_power_of_2(d)
    return dict(BLOCK_B=block_b, BLOCK_H=bd, BLOCK_D=bd, USE_DOT=block_b > 1, INTERPRET=False, slices=1,
                groups=groups, num_warps=4)


@pytest.mark.parametrize("b,length,d,block_b", [(3, 9, 24, 1), (18, 6, 16, 16)])
def test_triton_barrier_mode_one_slice(fresh_seed, b, length, d, block_b):
    """The GPU mode's h exchange buffer, ping-pong and barrier arithmetic (with one participant per group),
    the broadcast-reduce (BB = 1) and the tl.dot (BB = 16, two groups, the second one partly empty) paths."""
    g = make_gru(d)
    x = torch.randn(b, length, d, device=DEVICE)
    steps = make_steps(b, length, True)
    w_ih, w_hh, b_ih, b_hh = weights(g)
    with torch.no_grad():
        gi = input_projection(x, w_ih, b_ih)
        y = gru_recurrence_triton(gi, w_hh, b_hh, steps, config=gpu_mode(block_b, d, triton.cdiv(b, block_b)))
        y_again = gru_recurrence_triton(gi, w_hh, b_hh, steps, config=gpu_mode(block_b, d, triton.cdiv(b, block_b)))
    ref = reference(g, x, steps)
    assert rel_err(y, ref) <= 1e-5
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_again, y, rtol=0, atol=0)  # the cached counters are valid again after a launch


def test_triton_one_launch_for_all_steps(fresh_seed, monkeypatch):
    """T steps -> exactly one kernel launch (no per-step launches, no extra kernels)."""
    launches = []
    kernel = gru_triton._gru_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(gru_triton, "_gru_kernel", Counting())
    g = make_gru(16)
    x = torch.randn(2, 11, 16, device=DEVICE)
    steps = torch.tensor([11, 6], device=DEVICE)
    y = call(g, x, steps, "triton")
    assert len(launches) == 1, launches
    torch.testing.assert_close(y, reference(g, x, steps), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2, 8, 15, 16, 32, 100, 256, 528])
def test_gpu_launch_settings_fit_the_device(batch):
    """The persistent grid at d = 256 on a 132-SM H200: all programs co-resident (S * G <= SMs), W_hh split
    across >= 4 programs, slices tiling the hidden size, tl.dot tiles >= 16."""
    sms = 132
    assert batch <= max_batch_per_launch(256, sms)
    cfg = gru_settings(batch, 256, sms, interpret=False)
    assert cfg["slices"] * cfg["groups"] <= sms
    assert cfg["slices"] >= 4 and cfg["slices"] * cfg["BLOCK_H"] == cfg["BLOCK_D"] == 256
    assert cfg["groups"] * cfg["BLOCK_B"] >= batch
    if cfg["USE_DOT"]:
        assert cfg["BLOCK_B"] >= 16 and cfg["BLOCK_H"] >= 16
    else:
        assert cfg["BLOCK_B"] == 1
    assert max_batch_per_launch(256, sms) < 1024  # larger batches are split into co-resident launches
    with pytest.raises(KernelInputError, match="co-resident"):
        gru_settings(16 * sms + 1, 256, sms, interpret=False)


# ---------------------------------------------------------------------------------------------------------
# ONNX: one GRU node, run in onnxruntime at shapes other than the traced one
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("half", [False, True])
def test_onnx_export_is_one_gru_node(fresh_seed, tmp_path, half):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from kernels.gru import onnx_translation_table

    d = 24
    m = TinyHead(d, "torch").cpu().eval()
    dtype = torch.float16 if half else torch.float32
    x = torch.randn(3, 9, d, dtype=dtype)
    steps = torch.tensor([9, 4, 1])
    b, t = torch.export.Dim("batch", min=1, max=256), torch.export.Dim("length", min=2, max=128)
    with torch.no_grad():
        program = torch.onnx.export(m.to(dtype), (x, steps), dynamo=True, dynamic_shapes=({0: b, 1: t}, {0: b}),
                                    input_names=["x", "steps"], output_names=["h"],
                                    custom_translation_table=onnx_translation_table())
    path = tmp_path / "gru.onnx"
    program.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GRU") == 1 and not {"Loop", "Scan", "MatMul", "Gemm"} & set(ops), ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref_gru = m.gru.cpu()
    for bb, tt in [(5, 23), (1, 75), (2, 2)]:
        x2 = torch.randn(bb, tt, d)
        s2 = torch.randint(1, tt + 1, (bb,))
        s2[0] = tt
        (h,) = session.run(["h"], {"x": x2.to(dtype).numpy(), "steps": s2.numpy()})
        ref = reference(ref_gru, x2, s2) * 2.0
        assert rel_err(torch.from_numpy(h), ref) <= (2e-3 if half else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_row_steps_on_packed_w_hh_match_nn_gru(fresh_seed, dtype):
    """Several active rows at H = 256 take oneDNN's GEMM on W_hh packed in its dtype (fp32 from 11 rows; bf16
    where the CPU has fast bf16 kernels): the state still matches nn.GRU (fp32 1e-5, bf16 within 2e-2)."""
    from kernels import onednn
    from kernels.gru import _packed_hh

    if dtype == torch.bfloat16 and not onednn.packing_enabled(dtype):
        pytest.skip("no fast oneDNN bf16 kernels on this CPU")
    g = make_gru(256)
    x = torch.randn(13, 37, 256, device=DEVICE)
    steps = torch.tensor([37, 37, 30, 30, 29, 25, 20, 20, 19, 9, 9, 3, 1], device=DEVICE)
    w_ih, w_hh, b_ih, b_hh = weights(g, dtype)
    with torch.no_grad():
        assert _packed_hh(torch.zeros(13, 256), w_hh) is not None
        y = gru_last_state(x.to(dtype), w_ih, w_hh, b_ih, b_hh, steps, backend="torch")
    ref = reference(g, x, steps)
    assert rel_err(y.float(), ref) <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sigmoid_form_is_the_gru_step(fresh_seed, dtype):
    """The torch loop's rescaled weights: with s = (h + 1) / 2, ``s W'^T + b'`` = [gh_r, gh_z, 2 gh_n] and
    ``(s - 1/2) W'^T + b' + c`` the same (the half path's form), so sigmoid(2 gi_n + r * 2 gh_n) = (tanh(..) + 1) / 2;
    the doubled input weights give 2 gi_n exactly."""
    from kernels.gru import _sigmoid_form, _sigmoid_input

    hid = 24
    w_hh, b_hh = (torch.randn(3 * hid, hid) / 4).to(dtype), torch.randn(3 * hid).to(dtype)
    w_ih, b_ih = torch.randn(3 * hid, 16).to(dtype), torch.randn(3 * hid).to(dtype)
    w2, b2, c = _sigmoid_form(w_hh, b_hh)
    h = torch.rand(5, hid, dtype=torch.float64) * 2 - 1
    s = (h + 1) / 2
    gh = h @ w_hh.double().T + b_hh.double()
    want = torch.cat([gh[:, : 2 * hid], 2 * gh[:, 2 * hid:]], 1)
    assert w2.dtype == dtype
    torch.testing.assert_close(s @ w2.double().T + b2.double(), want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close((s - 0.5) @ w2.double().T + b2.double() + c.double(), want, rtol=1e-6, atol=1e-5)
    wi2, bi2 = _sigmoid_input(w_ih, b_ih)
    assert torch.equal(wi2[: 2 * hid], w_ih[: 2 * hid]) and torch.equal(wi2[2 * hid:], 2 * w_ih[2 * hid:])
    assert torch.equal(bi2[2 * hid:], 2 * b_ih[2 * hid:])
    u = torch.randn(5, hid, dtype=torch.float64)
    torch.testing.assert_close(torch.sigmoid(2 * u), (torch.tanh(u) + 1) / 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_rows_skip_the_input_gemm(fresh_seed, monkeypatch, dtype):
    """The torch loop projects only the rows it reads (t < steps[b]) that are not all zero (a zero row's
    projection is b_ih exactly): as the saliency head's input, zero past each sample's window. Same result as
    the full GEMM and nn.GRU; a NaN row still reaches the GEMM; past the row limit it is one full GEMM."""
    import kernels.gru as kg

    g = make_gru(40)
    b, length = 5, 37
    steps = torch.tensor([37, 30, 30, 12, 3])
    window = torch.tensor([9, 30, 0, 5, 2])  # nonzero rows per sample
    x = torch.randn(b, length, 40) * (torch.arange(length)[None, :, None] < window[:, None, None])
    x[1, 3] = 0.0  # a zero row inside a window
    seen = []
    real = kg.linear
    monkeypatch.setattr(kg, "linear", lambda a, *w: seen.append(a.shape[0]) or real(a, *w))
    w = weights(g, dtype)
    with torch.no_grad():
        y = gru_last_state(x.to(dtype), *w, steps, backend="torch")
        monkeypatch.setattr(kg, "SPARSE_ROWS_MAX_FRACTION", -1.0)
        y_full = gru_last_state(x.to(dtype), *w, steps, backend="torch")
    assert seen == [9 + 29 + 0 + 5 + 2, b * length]
    torch.testing.assert_close(y, y_full, rtol=1e-6, atol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(y, reference(g, x, steps), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(kg, "SPARSE_ROWS_MAX_FRACTION", 0.75)
    x[3, 20] = float("nan")  # past sample 3's 12 steps: never read
    x[4, 1] = float("nan")
    with torch.no_grad():
        y_nan = gru_last_state(x.to(dtype), *w, steps, backend="torch")
    assert torch.isnan(y_nan[4]).all() and not torch.isnan(y_nan[:4]).any()


def test_derived_weights_are_made_once_under_inference_mode(fresh_seed, monkeypatch):
    """The rescaled W_hh is itself the source of the blocked / packed layouts: under torch.inference_mode (how
    the engine runs) those must still be made once, not every call (an inference tensor has no version
    counter, so a derived copy made in inference mode could not key copies of its own)."""
    import kernels.gru as kg

    g = make_gru(32)
    made = []
    real = kg._w_blocks
    monkeypatch.setattr(kg, "_w_blocks", lambda w, k: made.append(k) or real(w, k))
    w = weights(g)
    x, steps = torch.randn(1, 9, 32), torch.tensor([9])
    with torch.inference_mode():
        y1 = gru_last_state(x, *w, steps, backend="torch")
        y2 = gru_last_state(x, *w, steps, backend="torch")
        w2 = kg._sigmoid_form(w[1], w[3])[0]
    assert len(made) == 1 and not w2.is_inference() and w2 is kg._sigmoid_form(w[1], w[3])[0]
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, reference(g, x, steps), rtol=1e-5, atol=1e-5)
