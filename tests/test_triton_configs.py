"""Launch configs of the Triton kernels: the committed table, the opt-in tuner, and that
generating text never tunes (kernels/triton_configs.py)."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from gpt.model import GPT, GPTConfig
from kernels import reference, triton_attention, triton_configs, triton_decode, triton_runtime
from kernels.triton_configs import ANY, TABLE, LaunchConfig, TunedConfigs

LENGTHS = [name for name, _ in triton_configs.LENGTH_CLASSES]


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", triton_configs.ARCHS)
def test_every_key_resolves_to_a_legal_config_that_fits(arch):
    keys = itertools.product(
        triton_configs.KERNELS, ("16-bit", "float32"), (True, False), LENGTHS, triton_configs.HEAD_DIMS
    )
    for kernel, dtype_class, causal, length, head_dim in keys:
        cfg = triton_configs.table_config(arch, kernel, dtype_class, causal, length, head_dim)
        assert triton_configs.problems(kernel, cfg, head_dim, dtype_class, arch) == [], (
            arch,
            kernel,
            dtype_class,
            causal,
            length,
            head_dim,
            cfg,
        )
        assert triton_configs.shared_memory(kernel, cfg, head_dim, dtype_class) <= triton_configs.SHARED_MEMORY[arch]


def test_table_rows_are_well_formed():
    for rows in TABLE.values():
        for (kernel, dtype_class, causal, length), row in rows.items():
            assert kernel in triton_configs.KERNELS and dtype_class in triton_configs.ELEMENT_SIZE
            assert causal in (True, False, ANY) and length in (*LENGTHS, ANY)
            assert all(isinstance(cfg, LaunchConfig) for cfg in row.values())
            assert all(cfg.variants == () for cfg in row.values())  # every default launches today's kernels


def test_variant_fields_default_off_and_are_refused_where_not_implemented():
    """LaunchConfig(a, b, c, d) is today's kernel; dq_atomic is the dK/dV kernel's alone."""
    plain = LaunchConfig(32, 64, 8, 2)
    assert plain.dq_atomic is False and plain.variants == () and plain.label() == "(32, 64, 8, 2)"
    single = plain._replace(dq_atomic=True)
    assert single.variants == ("dq_atomic",) and single.label() == "(32, 64, 8, 2)+dq_atomic"
    assert triton_configs.problems("dkdv", single, 128, "16-bit", "sm90") == []
    for kernel in ("fwd", "dq", "decode"):
        found = triton_configs.problems(kernel, single, 128, "16-bit", "sm90")
        assert found == [f"LaunchConfig.dq_atomic=True is a dkdv variant; the {kernel} kernel has none"]


def test_the_single_pass_takes_each_dkdv_config_with_dq_atomic_unless_it_spills():
    """triton_configs.single_pass: the dK/dV config with dq_atomic on, except the configs whose
    single pass spilled on sm_90 (SINGLE_PASS), which are table rows and get a fitting config."""
    row = triton_configs.table_config("sm90", "dkdv", "16-bit", True, "long", 128)
    assert row not in triton_configs.SINGLE_PASS
    assert triton_configs.single_pass(row) == row._replace(dq_atomic=True)
    dkdv_rows = {
        cfg for rows in TABLE.values() for key, by_d in rows.items() if key[0] == "dkdv" for cfg in by_d.values()
    }
    for two_pass, config in triton_configs.SINGLE_PASS.items():
        assert two_pass in dkdv_rows and config.dq_atomic and config.variants == ("dq_atomic",)
        assert triton_configs.single_pass(two_pass) == config


def test_the_most_specific_row_wins():
    decode = TABLE["sm90"][("fwd", "16-bit", ANY, "decode")][64]
    every_length = TABLE["sm90"][("fwd", "16-bit", ANY, ANY)][64]
    assert decode != every_length  # otherwise this test proves nothing
    assert triton_configs.table_config("sm90", "fwd", "16-bit", True, "decode", 64) == decode
    assert triton_configs.table_config("sm90", "fwd", "16-bit", True, "short", 64) == every_length


@pytest.mark.parametrize(
    "q_len, expected",
    [(1, "decode"), (16, "decode"), (17, "short"), (1024, "short"), (1025, "medium"), (4096, "medium"), (4097, "long")],
)
def test_length_classes(q_len, expected):
    assert triton_configs.length_class(q_len) == expected


def test_architectures():
    assert triton_configs.arch_of((9, 0)) == "sm90"
    assert triton_configs.arch_of((8, 0)) == "sm80"
    assert triton_configs.arch_of((8, 6)) == "generic"  # 99 KiB of shared memory, not A100's 163
    assert triton_configs.arch_of((12, 0)) == "generic"


def test_problems_are_found():
    def problems(cfg, kernel="fwd", head_dim=64, dtype_class="16-bit", arch="sm90"):
        return triton_configs.problems(kernel, LaunchConfig(*cfg), head_dim, dtype_class, arch)

    assert problems((64, 32, 4, 2)) == []
    assert "BLOCK_M=48" in problems((48, 32, 4, 2))[0]
    assert "BLOCK_N=8" in problems((64, 8, 4, 2))[0]
    # forward, head dim 256, float32: (64 + 2 * 64 * 4 stages) rows * 256 * 4 bytes = 576 KiB
    assert "shared memory" in " ".join(problems((64, 64, 8, 4), head_dim=256, dtype_class="float32"))
    assert "spill" in problems((128, 128, 4, 1), head_dim=256)[-1]  # 256 accumulators per thread
    # the same config fits an H100 but not the generic 99 KiB
    assert problems((128, 64, 4, 3), head_dim=128) == []
    assert problems((128, 64, 4, 3), head_dim=128, arch="generic") != []


def test_the_tuner_and_the_table_agree_on_the_kernels():
    """Every kernel has table rows for every architecture, dtype class and head dim; the tuner
    has candidates for exactly TUNED_KERNELS; the rest (decode) are never tuned."""
    for arch, rows in TABLE.items():
        assert {kernel for kernel, *_ in rows} == set(triton_configs.KERNELS), arch
    assert set(triton_configs.TUNED_KERNELS) <= set(triton_configs.KERNELS)
    assert set(triton_configs.CANDIDATE_BLOCKS) == set(triton_configs.TUNED_KERNELS)
    for kernel in set(triton_configs.KERNELS) - set(triton_configs.TUNED_KERNELS):
        with pytest.raises(KeyError):
            triton_configs.candidates("sm90", kernel, "16-bit", True, "decode", 64)


@pytest.mark.parametrize("arch", triton_configs.ARCHS)
def test_autotune_candidates_start_with_the_table_and_all_fit(arch):
    for kernel, head_dim in itertools.product(triton_configs.TUNED_KERNELS, triton_configs.HEAD_DIMS):
        found = triton_configs.candidates(arch, kernel, "16-bit", True, "short", head_dim)
        assert found[0] == triton_configs.table_config(arch, kernel, "16-bit", True, "short", head_dim)
        assert len(set(found)) == len(found)
        for cfg in found[1:]:
            assert triton_configs.problems(kernel, cfg, head_dim, "16-bit", arch) == []
            if arch == "sm90":
                assert cfg.num_warps == 4 or cfg.block_m * cfg.block_n >= 128 * 128


# ---------------------------------------------------------------------------------------
# The tuner and its file
# ---------------------------------------------------------------------------------------


def test_tuned_winner_persists_between_processes(tmp_path, monkeypatch):
    """A winner tuned by one TunedConfigs (one process) is read back by a fresh one untimed."""
    import triton.testing

    configs = [LaunchConfig(128, 64, 4, 3), LaunchConfig(64, 64, 4, 3), LaunchConfig(64, 32, 4, 2)]
    times = {configs[0]: 3.0, configs[1]: 1.0, configs[2]: 2.0}
    timed = []

    def fake_do_bench(fn):
        fn()
        return times[timed[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    path = triton_configs.tuning_file(tmp_path / "gpt-kernels", "NVIDIA H100 80GB HBM3", "3.6.0")
    assert path.name == "NVIDIA-H100-80GB-HBM3-triton3.6.0.json"

    first = TunedConfigs(path)
    assert first.winner("sm90/fwd/bfloat16/d64/causal/short", configs, timed.append) == configs[1]
    assert timed == configs  # every candidate timed once
    assert first.winner("sm90/fwd/bfloat16/d64/causal/short", configs, timed.append) == configs[1]
    assert len(timed) == 3  # remembered in memory

    fresh = TunedConfigs(path)  # as a new process would
    assert fresh.winner("sm90/fwd/bfloat16/d64/causal/short", configs, timed.append) == configs[1]
    assert len(timed) == 3  # read from disk, not tuned again
    assert json.loads(path.read_text()) == {"sm90/fwd/bfloat16/d64/causal/short": [64, 64, 4, 3]}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_tuned_configs_store_variant_fields_by_name(tmp_path):
    """A winner's variant fields are written by name, so a file reads back the same configs
    whatever order LaunchConfig declares its fields in."""
    path = tmp_path / "tuned.json"
    single = LaunchConfig(32, 64, 8, 2, dq_atomic=True)
    TunedConfigs(path).winner("a", [single], run=None)
    TunedConfigs(path).winner("b", [LaunchConfig(16, 16, 4, 1)], run=None)
    assert json.loads(path.read_text()) == {"a": [32, 64, 8, 2, "dq_atomic"], "b": [16, 16, 4, 1]}
    assert TunedConfigs(path).winner("a", [LaunchConfig(16, 16, 4, 1)], run=None) == single


def test_tuned_configs_merge_what_other_processes_wrote(tmp_path):
    path = tmp_path / "gpu.json"
    a, b = TunedConfigs(path), TunedConfigs(path)
    a.winner("key-a", [LaunchConfig(16, 16, 4, 1)], run=None)
    b.winner("key-b", [LaunchConfig(32, 32, 4, 1)], run=None)
    assert set(json.loads(path.read_text())) == {"key-a", "key-b"}


def test_unreadable_tuning_file_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring tuned configs"):
        assert TunedConfigs(path).winner("k", [LaunchConfig(16, 16, 4, 1)], run=None) == LaunchConfig(16, 16, 4, 1)


def test_switches_are_read_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT_KERNELS_AUTOTUNE", "1")
    monkeypatch.setenv("GPT_KERNELS_NAN_FILL", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert triton_runtime.Switches.from_env() == triton_runtime.Switches(True, True, tmp_path / "gpt-kernels")
    monkeypatch.delenv("GPT_KERNELS_AUTOTUNE")
    assert not triton_runtime.Switches.from_env().autotune


# ---------------------------------------------------------------------------------------
# Generating text never tunes, and with tuning on, tunes once per class
# ---------------------------------------------------------------------------------------


def test_lengths_are_not_specialized():
    """A growing kv_len (and any q_len), a packed batch's total length, a new dropout seed or
    window must not make Triton compile a new kernel variant: none is specialized on.

    Checked on the compiled-mode kernels (TRITON_INTERPRET=0, as on a GPU), in a subprocess.
    """
    code = (
        "from kernels import triton_attention as ta, triton_decode as td\n"
        "kernels = (ta._attn_fwd, ta._attn_bwd_dkdv, ta._attn_bwd_dq, ta._attn_bwd_preprocess, td._decode_split,\n"
        "           td._decode_combine)\n"
        "for kernel in kernels:\n"
        "    print(kernel.fn.__name__, *sorted(p.name for p in kernel.params if p.do_not_specialize))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    options = "batch_heads dropout_seed dropout_threshold stride_lse_h window"
    assert result.stdout.split("\n")[:6] == [
        f"_attn_fwd N_K N_Q {options}",
        f"_attn_bwd_dkdv N_K N_Q {options}",
        f"_attn_bwd_dq N_K N_Q {options}",
        "_attn_bwd_preprocess N_Q batch_heads stride_lse_h",
        "_decode_split N_K N_Q batch_heads split_size window",
        "_decode_combine N_Q num_splits",
    ]


def test_option_values_reach_the_kernels_as_32_bit_arguments():
    """Triton types an int argument i32 or i64 by its value: the seed and the dropout threshold
    travel as int32 bit patterns, so seeds past 2**31 and probabilities past 1/2 share the binary."""
    from kernels.triton_common import Options, arguments

    for seed, p in ((0, 0.1), (2**31 + 5, 0.5), (2**32 - 1, 0.99)):
        values = arguments(Options(True, 0.125, dropout_p=p, dropout_seed=seed))
        for name in ("dropout_seed", "dropout_threshold"):
            assert -(2**31) <= values[name] < 2**31
        assert values["dropout_seed"] % 2**32 == seed
        assert values["dropout_threshold"] % 2**32 == int(p * 2**32)
    plain = arguments(Options(True, 0.125))
    assert {name for name, value in plain.items() if value is not None} == {"qk_scale"}


@pytest.fixture
def counted_tuner(monkeypatch):
    """Replaces the tuner (the one function that benchmarks) with one that counts its calls."""
    calls = []

    def tune(configs, run):
        calls.append(configs)
        return configs[0]

    monkeypatch.setattr(triton_configs, "tune", tune)
    return calls


def generate_50_tokens():
    """A one-layer GPT with head dim 16 on the triton backend: a 20-token prompt (length
    class "short"), then 50 tokens decoded one at a time against a growing cache."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=80, n_layer=1, n_head=1, d_model=16, head="full", attn="triton"))
    prompt = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(1))
    return model.generate(prompt, 50, generator=torch.Generator().manual_seed(2))


def test_generating_never_calls_the_tuner(counted_tuner, one_thread, monkeypatch):
    decode_calls = []
    decode = triton_decode.decode
    monkeypatch.setattr(triton_decode, "decode", lambda *args: decode_calls.append(1) or decode(*args))
    out = generate_50_tokens()
    assert out.shape == (1, 70)
    assert counted_tuner == []
    assert len(decode_calls) == 49  # every token after the prompt's goes through the split-KV kernel


def test_with_autotune_on_each_class_is_tuned_once(counted_tuner, one_thread, monkeypatch, tmp_path):
    monkeypatch.setattr(triton_runtime, "SWITCHES", triton_runtime.Switches(autotune=True, tuning_dir=tmp_path))
    generate_50_tokens()
    # The prompt's forward ("short") only: decoding steps take the split-KV kernel's table config.
    assert len(counted_tuner) == 1
    tuned = json.loads(next(tmp_path.iterdir()).read_text())
    assert [key.rsplit("/", 1)[-1] for key in tuned] == ["short"]
    generate_50_tokens()  # the same class again: remembered
    assert len(counted_tuner) == 1


def test_autotuning_times_each_kernel_on_its_own_and_stays_exact(monkeypatch, tmp_path):
    """With tuning on, the tuner gets a runnable launch for each of the three kernels (run
    here once each, as do_bench would), and the results stay those of the reference."""
    ran = []

    def tune(configs, run):
        run(configs[0])
        ran.append(configs[0])
        return configs[0]

    monkeypatch.setattr(triton_configs, "tune", tune)
    monkeypatch.setattr(triton_runtime, "SWITCHES", triton_runtime.Switches(autotune=True, tuning_dir=tmp_path))
    q, k, v = (torch.randn(1, 2, 21, 16, requires_grad=True) for _ in range(3))
    out = triton_attention.attention(q, k, v, causal=True, scale=0.25)
    out.sum().backward()
    assert len(ran) == 3  # fwd, dkdv, dq
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference.attention(*exact, causal=True, scale=0.25)
    expected.sum().backward()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    for got, want in zip((q, k, v), exact):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# The ahead-of-time compile check (kernels/compile_check.py), in subprocesses: it compiles
# for real GPUs (TRITON_INTERPRET=0), which this test process, interpreting, cannot
# ---------------------------------------------------------------------------------------


def run_compiled_mode(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


# Records the forward's launches for three inputs: the two layouts the model makes, and one
# with a head-dim stride of 2 (q) and a key pointer 2 bytes past a 16-byte boundary (k). For
# each launch, prints what compile_check recorded next to what Triton's rules give for the
# very arguments the launch code passed (seen by a pre-run hook of the JIT kernel).
SPECIALIZATION_CODE = """
import json, torch
from triton.runtime.jit import mangle_type
from kernels import compile_check as cc, triton_attention as ta
from kernels.triton_configs import LaunchConfig

kernel, seen = ta._attn_fwd, []
kernel.add_pre_run_hook(lambda *args, **kwargs: seen.append((args, kwargs)))
x = {layout: cc.inputs(cc.Call(layout, True, "short"), torch.bfloat16, 64) for layout in cc.LAYOUTS}
x["strided"] = cc.inputs(cc.Call("contiguous", True, "short"), torch.bfloat16, 64)
x["strided"].q = torch.empty(2, 4, 1024, 128, dtype=torch.bfloat16, device="meta")[..., ::2]
x["strided"].k = torch.empty(2 * 4 * 1024 * 64 + 1, dtype=torch.bfloat16, device="meta")[1:].view(2, 4, 1024, 64)
found = {}
for name, inputs in x.items():
    launch, = cc.record_launches("sm90", lambda: cc._run_forward(inputs, LaunchConfig(64, 32, 4, 2)))
    args, kwargs = seen.pop()
    bound = kernel.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in kernel.signature.parameters})
    expected, divisible = {}, set()
    for p in kernel.params:
        value = bound.arguments[p.name]
        specialize = not p.do_not_specialize
        expected[p.name] = "constexpr" if p.is_constexpr else mangle_type(value, specialize)
        if isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0:
            divisible.add(p.name)
        if type(value) is int and specialize and not p.is_constexpr and value != 1 and value % 16 == 0:
            divisible.add(p.name)
    found[name] = dict(
        signature=launch.signature, expected=expected, constants=launch.constants,
        divisible=sorted(launch.divisible_by_16), expected_divisible=sorted(divisible),
    )
print(json.dumps(found))
"""


def test_compile_check_specializes_as_a_launch_does():
    """compile_check compiles the signature Triton's launcher makes of the launch code's own
    arguments: head-dim strides of 1 become constants, other integers stay ints (divisible by
    16 when they are, the unspecialized lengths never), pointers are 16-aligned where they are."""
    result = run_compiled_mode(SPECIALIZATION_CODE)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for name, launch in found.items():
        assert launch["signature"] == launch["expected"], name
        assert launch["divisible"] == launch["expected_divisible"], name
        assert launch["signature"]["N_Q"] == launch["signature"]["N_K"] == "i32"  # do_not_specialize
        assert not {"N_Q", "N_K", "H"} & set(launch["divisible"])  # lengths unspecialized; 4 heads
        assert launch["signature"]["stride_qm"] == "i32" and "stride_qm" in launch["divisible"]
    for name in ("fused QKV", "contiguous"):
        signature, constants = found[name]["signature"], found[name]["constants"]
        for stride in ("stride_qd", "stride_kd", "stride_vd", "stride_od"):
            assert signature[stride] == "constexpr" and constants[stride] == 1, (name, stride)
        assert {"Q", "K", "V", "Out", "Lse"} <= set(found[name]["divisible"])
    strided = found["strided"]
    assert strided["signature"]["stride_qd"] == "i32" and strided["signature"]["stride_kd"] == "constexpr"
    assert "Q" in strided["divisible"] and "K" not in strided["divisible"]


def test_compile_check_finds_wgmma_and_async_copies_on_sm90():
    """A small 16-bit forward compiled for an H100 without one: Hopper's wgmma, the pipelined
    loads' asynchronous copies (num_stages 2), no spill, and no TMA (the pointer path)."""
    code = (
        "import json, torch\n"
        "from kernels import compile_check as cc\n"
        "from kernels.triton_configs import LaunchConfig\n"
        "x = cc.inputs(cc.Call('fused QKV', True, 'short'), torch.bfloat16, 32)\n"
        "launch, = cc.record_launches('sm90', lambda: cc._run_forward(x, LaunchConfig(64, 32, 4, 2)))\n"
        "print(json.dumps(cc.compile_launch('sm90', launch)))\n"
    )
    result = run_compiled_mode(code)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 < found["regs"] <= 255 and found["spill"] == 0
    assert 0 < found["smem"] <= triton_configs.SHARED_MEMORY["sm90"]
    assert found["wgmma"] > 0 and found["cp.async"] > 0 and found["tma"] == 0


def test_compile_check_finds_the_single_pass_backwards_atomic_adds_on_sm90():
    """The dK/dV row of head dim 64 compiled for an H100 with dq_atomic, as --hopper-variants
    does: wgmma (its 128-key tiles), asynchronous copies (3 stages), float32 atomic adds into dQ,
    no spill, and compile_check's NEEDS satisfied. The same row's two-pass program has no atomic
    add, and checked as the variant it fails: a variant that lost its atomics is caught."""
    code = (
        "import json, torch\n"
        "from kernels import compile_check as cc, triton_configs as tc\n"
        "table = tc.table_config('sm90', 'dkdv', '16-bit', True, 'short', 64)\n"
        "out = {}\n"
        "for name, cfg in (('single', tc.with_variant('dq_atomic', table)), ('two-pass', table)):\n"
        "    row = cc.Row('sm90', 'dkdv', '16-bit', tc.ANY, tc.ANY, 64, cfg, table_cfg=table)\n"
        "    x = cc.inputs(cc.Call('fused QKV', True, 'short'), torch.bfloat16, 64)\n"
        "    launches = cc.record_launches('sm90', lambda: cc._run_backward(x, cfg))\n"
        "    launch, = [l for l in launches if l.kernel.endswith('._attn_bwd_dkdv')]\n"
        "    result = cc.compile_launch('sm90', launch)\n"
        "    out[name] = dict(result, kernels=[l.kernel.rpartition('.')[2] for l in launches],\n"
        "                     label=row.label(), calls=len(row.calls()))\n"
        "    variant = cc.Row('sm90', 'dkdv', '16-bit', tc.ANY, tc.ANY, 64, tc.with_variant('dq_atomic', table))\n"
        "    out[name]['problems'] = cc.problems(variant, result)\n"
        "print(json.dumps(out))\n"
    )
    result = run_compiled_mode(code)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    single, two_pass = found["single"], found["two-pass"]
    assert single["label"].endswith("+dq_atomic") and single["calls"] == two_pass["calls"] > 0
    assert "_attn_bwd_dq" not in single["kernels"] and "_attn_bwd_dq" in two_pass["kernels"]
    assert single["wgmma"] > 0 and single["cp.async"] > 0 and single["atomic"] > 0 and single["spill"] == 0
    assert 0 < single["smem"] <= triton_configs.SHARED_MEMORY["sm90"]
    assert single["problems"] == []
    assert two_pass["atomic"] == 0
    assert two_pass["problems"] == ["no atomic: dq_atomic adds dQ into float32 memory with atomic reductions"]


def test_compile_check_fails_rows_that_spill_or_do_not_fit():
    """Exit code 1 and one line per failing row: a forward that spills (4 warps at head dim
    128 with 128x64 tiles) and a decode row whose 6-stage pipeline of 128-key blocks needs
    more than the H100's 227 KiB of shared memory."""
    code = (
        "import sys\n"
        "from kernels import compile_check as cc, triton_configs as tc\n"
        "from kernels.triton_configs import LaunchConfig\n"
        "tc.TABLE['sm90'] = {\n"
        "    ('fwd', '16-bit', True, tc.ANY): {128: LaunchConfig(128, 64, 4, 3)},\n"
        "    ('decode', '16-bit', tc.ANY, tc.ANY): {256: LaunchConfig(16, 128, 4, 6)},\n"
        "}\n"
        "sys.exit(cc.main(['--arch', 'sm90', '--jobs', '2']))\n"
    )
    result = run_compiled_mode(code)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    failed = result.stdout.split("row(s) failed:")[-1].strip().splitlines()
    assert len(failed) == 2, result.stdout
    assert failed[0].startswith("sm90 fwd 16-bit True any 128 (128, 64, 4, 3): spills ")
    assert failed[1].startswith("sm90 decode 16-bit any any 256 (16, 128, 4, 6): ")
    assert "KiB shared memory, sm90 has 227 KiB" in failed[1]


def test_compile_check_reports_a_variants_spills_without_failing_it():
    """The spill limit is the table's: a table row's program that spills fails; the same numbers
    for a variant (a --hopper-variants row, or --variants' calls with every feature on) are
    printed, not failed; and a variant that lost the instruction it exists for still fails."""
    code = (
        "import json\n"
        "from kernels import compile_check as cc, triton_configs as tc\n"
        "table = tc.LaunchConfig(128, 64, 4, 3)\n"
        "row = cc.Row('sm90', 'fwd', '16-bit', True, tc.ANY, 64, table)\n"
        "tma = cc.Row('sm90', 'fwd', '16-bit', True, tc.ANY, 64, table._replace(tma=True), table_cfg=table)\n"
        "result = {'regs': 255, 'spill': 12, 'smem': 65536, 'wgmma': 32, 'mma': 0, 'cp.async': 48, 'tma': 0,\n"
        "          'atomic': 0}\n"
        "plain = [cc.Call('fused QKV', True, 'short')]\n"
        "featured = [cc.Call('fused QKV', True, 'short', features=cc.VARIANT)]\n"
        "print(json.dumps(dict(\n"
        "    table=cc.problems(row, result, cc.is_variant(row, plain)),\n"
        "    features=cc.problems(row, result, cc.is_variant(row, featured)),\n"
        "    tma=cc.problems(tma, result, cc.is_variant(tma, plain)),\n"
        "    line=cc.line(row, featured, result, []))))\n"
    )
    result = run_compiled_mode(code)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["table"] == ["spills 12 bytes per thread (limit 0)"]
    assert found["features"] == []
    assert found["tma"] == ["no tma: tma=True loads through tensor descriptors (TMA: cp.async.bulk.tensor)"]
    assert found["line"].endswith("  ok (a variant: spills reported, not failed)")


# The forward's variants, compiled for sm_90: a one-row table (head dim 32, causal, "short"), with
# --hopper-variants. Then again with the launch code's descriptor rule broken so that every input
# takes the pointer path: the TMA rows lose cp.async.bulk.tensor, and the check must fail on them.
HOPPER_VARIANTS_CODE = """
import sys
from kernels import compile_check as cc, triton_attention, triton_configs as tc
from kernels.triton_configs import LaunchConfig
tc.TABLE['sm90'] = {('fwd', '16-bit', True, 'short'): {32: LaunchConfig(64, 32, 4, 2)}}
print('exit', cc.main(['--arch', 'sm90', '--jobs', '2', '--hopper-variants']))
triton_attention._descriptor_accepts = lambda t: False
print('exit', cc.main(['--arch', 'sm90', '--jobs', '2', '--hopper-variants']))
"""


def test_compile_check_compiles_the_forward_variants_and_fails_one_that_lost_tma():
    result = run_compiled_mode(HOPPER_VARIANTS_CODE)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = result.stdout.split("exit 0\n")
    assert second.rstrip().endswith("exit 1"), result.stdout
    columns = compile_check_columns(first)
    assert set(columns) == {
        "(64, 32, 4, 2)",
        "(64, 32, 4, 2)+tma",
        "(64, 32, 4, 2)+persistent",
        "(64, 32, 4, 2)+tma+persistent",
    }, first
    for label, found in columns.items():
        assert found["wgmma"] > 0 and found["spill"] == 0 and found["result"] == "ok", (label, found)
        if "tma" in label:  # descriptors: bulk tensor copies instead of cp.async
            assert found["tma"] > 0 and found["cp.async"] == 0, (label, found)
        else:
            assert found["tma"] == 0 and found["cp.async"] > 0, (label, found)
    assert "warp_specialize: not compiled, refused by the launch code" in first
    failed = second.split("row(s) failed:")[-1].strip().splitlines()[:-1]
    assert sorted(line.split(": ")[0] for line in failed) == [
        "sm90 fwd 16-bit True short 32 (64, 32, 4, 2)+tma",
        "sm90 fwd 16-bit True short 32 (64, 32, 4, 2)+tma+persistent",
    ], second
    assert all("no tma: tma=True loads through tensor descriptors" in line for line in failed)


def compile_check_columns(output: str) -> dict[str, dict]:
    """{config label: its numbers and result} from compile_check's table (one program per row here)."""
    found = {}
    for line in output.splitlines():
        if not line.startswith("sm90 "):
            continue
        label = line[line.index("(") : line.index("all ")].strip()
        names = ("regs", "spill", "smem", "wgmma", "mma", "cp.async", "tma", "atomic")  # compile_check.HEADER's
        *numbers, result = line[line.index("all ") + 4 :].split(None, len(names))
        found[label] = {**{n: float(x) for n, x in zip(names, numbers)}, "result": result.strip()}
    return found


def test_hopper_forward_candidates_fit_and_causal_ones_are_pruned():
    """The sm90 forward tries its per-head-dim tiles first, never one compile_check saw spill,
    and for causal calls never a BLOCK_M narrower than BLOCK_N."""
    for head_dim, extra in triton_configs.HOPPER_FORWARD_CANDIDATES.items():
        for causal in (True, False):
            found = triton_configs.candidates("sm90", "fwd", "16-bit", causal, "long", head_dim)
            assert [c for c in found if c in extra] == list(extra)
            assert found[1 : 1 + len(extra)] == list(extra)  # right after the table's own
            assert not set(found) & set(triton_configs.HOPPER_FORWARD_SPILLS.get(head_dim, ()))
            assert all(c.block_m >= c.block_n for c in found) or not causal
    full = triton_configs.candidates("sm90", "fwd", "16-bit", False, "long", 64)
    assert any(c.block_m < c.block_n for c in full)  # the pruning is causal's only
    assert LaunchConfig(128, 128, 8, 3) in triton_configs.candidates("sm90", "fwd", "16-bit", True, "long", 64)


def test_variant_fields_default_off_and_round_trip_through_the_tuning_file(tmp_path):
    plain = LaunchConfig(128, 64, 4, 3)
    assert plain.variants == () and plain.label() == "(128, 64, 4, 3)"
    variant = plain._replace(tma=True, persistent=True)
    assert variant.variants == ("tma", "persistent") and variant.label() == "(128, 64, 4, 3)+tma+persistent"
    path = tmp_path / "gpu.json"
    TunedConfigs(path).winner("plain", [plain], run=None)
    TunedConfigs(path).winner("variant", [variant], run=None)
    stored = json.loads(path.read_text())
    assert stored["plain"] == [128, 64, 4, 3] and stored["variant"] == [128, 64, 4, 3, "tma", "persistent"]
    fresh = TunedConfigs(path)
    assert fresh.winner("plain", [], run=None) == plain and fresh.winner("variant", [], run=None) == variant
