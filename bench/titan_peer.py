"""torchtitan's DeepSeek-V3 as a second training peer of `bench/train_throughput.py` (issue 27, item 1).

Our model saved as a transformers checkpoint (`hf.save_pretrained`) is loaded into torchtitan's own
`DeepSeekV3Model` through torchtitan's `DeepSeekV3StateDictAdapter.from_hf`, with `DeepSeekV3ModelArgs` set from our
`ModelConfig` (`titan_args`), and trained by the package's `step.train_step` on the same batches: fp32 weights under
bf16 autocast (what torchtitan does on one GPU without FSDP; its grouped experts cast to bf16 inside), plain
`torch.compile(model)`, fused AdamW, and torchtitan's own aux-loss-free bias update (the optimizer pre-hook that its
`build_optimizers_with_moe_load_balancing` registers, moved onto our AdamW).

Version: torchtitan 0.2.2. The newest, 0.3.0, imports `torch.distributed.fsdp.DataParallelMeshDims` when its
DeepSeek-V3 module loads, which torch 2.11 (the GPU machine's) does not have (torch >= 2.12); 0.2.2 predates it.

Equivalent arguments: sigmoid router, `route_norm` = norm_topk_prob, `route_scale` = routed_scaling_factor, scores
applied after the experts (`score_before_experts=False`, as torchtitan's own DeepSeek configs), expert groups =
n_group / topk_group (none when n_group is 1), `load_balance_coeff` = bias_update_speed, `norm_eps` = rms_norm_eps
(torchtitan's default 1e-5), no YaRN (`original_seq_len` = seq_len), SDPA attention (`DeepSeekV3ModelArgs`' default),
grouped-GEMM experts on sm90+ (its default there). One difference torchtitan does not let us set: its final norm is `nn.RMSNorm(dim)` with torch's
default eps (float32 machine epsilon, 1.2e-7) where ours has rms_norm_eps.

`python bench/titan_peer.py --check`: the CPU self-check (fp32, test-tiny with MTP off) of torchtitan against ours on
the same weights: the router's weights and expert ids, one attention layer, one MoE layer (its for-loop experts: the
grouped path pads tokens with a Triton kernel and runs in bf16) and the logits, as shipped and with the final eps equal.
On the CPU its router's `torch.histc` on int64 ids has no kernel: `CpuHistc` counts them with `bincount` there.

Wheels, all pure-Python, 1.5 MB: torchtitan 0.2.2 installed `--no-deps` imports its DeepSeek-V3 with tyro,
docstring_parser and torchdata, and with datasets (its `models.deepseek_v3` package imports its text dataloader),
which needs dill and multiprocess; the GPU machine has the rest (torch, tensorboard, einops, safetensors, pyarrow,
pandas, xxhash, fsspec, huggingface-hub, requests). datasets 4.8.4 asks pyarrow >= 21 and huggingface-hub < 2.
Download them here:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl torchtitan==0.2.2 tyro==1.0.17 docstring_parser==0.18.0 torchdata==0.11.0 datasets==4.8.4 \
        dill==0.4.1 multiprocess==0.70.19

and start the GPU call (carry `.whl`) with
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dsv3_min.config import ModelConfig, get_preset  # noqa: E402
from dsv3_min.data import get_batch  # noqa: E402
from dsv3_min.hf import save_pretrained  # noqa: E402
from dsv3_min.model import DeepSeekV3, LossParts  # noqa: E402
from dsv3_min.step import train_step  # noqa: E402
from dsv3_min.train import autocast_for  # noqa: E402


def titan_args(cfg: ModelConfig, seq_len: int, attn: str = "sdpa", grouped_mm: bool = True):
    "torchtitan's `DeepSeekV3ModelArgs` with the arguments of our `cfg` (MTP off)."
    from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
    from torchtitan.models.moe import MoEArgs
    if cfg.attention != "mla" or cfg.norm_scheme != "prenorm" or cfg.gated_attention:
        raise ValueError("torchtitan runs DeepSeek-V3's own architecture only (MLA, pre-norm, no gates)")
    groups = cfg.n_group if cfg.n_group > 1 else None
    moe = MoEArgs(num_experts=cfg.n_routed_experts, num_shared_experts=cfg.n_shared_experts, score_func="sigmoid",
                  route_norm=cfg.norm_topk_prob, route_scale=cfg.routed_scaling_factor, score_before_experts=False,
                  top_k=cfg.num_experts_per_tok, num_expert_groups=groups,
                  num_limited_groups=cfg.topk_group if groups else None, use_grouped_mm=grouped_mm,
                  load_balance_coeff=cfg.bias_update_speed)
    args = DeepSeekV3ModelArgs(
        max_seq_len=seq_len, original_seq_len=seq_len, vocab_size=cfg.vocab_size, dim=cfg.hidden_size,
        inter_dim=cfg.intermediate_size, moe_inter_dim=cfg.moe_intermediate_size, n_layers=cfg.num_hidden_layers,
        n_dense_layers=cfg.first_k_dense_replace, n_heads=cfg.num_attention_heads, norm_eps=cfg.rms_norm_eps,
        moe_args=moe, q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        attn_type=attn, rope_theta=cfg.rope_theta)
    args.moe_impl = "standard"  # what its `update_from_config` sets from the default job config (no DeepEP)
    return args


def load_titan(path, cfg: ModelConfig, seq_len: int, attn: str = "sdpa", device="cpu", grouped_mm: bool | None = None):
    """torchtitan's DeepSeek-V3 holding the weights of the transformers checkpoint at `path` (its adapter's `from_hf`);
    grouped-GEMM experts on sm90+ (`grouped_mm=None`), as torchtitan decides, else its for-loop experts."""
    device = torch.device(device)
    if grouped_mm is None:
        grouped_mm = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
    from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
    from torchtitan.models.deepseek_v3.model.state_dict_adapter import DeepSeekV3StateDictAdapter
    args = titan_args(cfg, seq_len, attn, grouped_mm)
    hf = {k: v for f in sorted(Path(path).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    sd = DeepSeekV3StateDictAdapter(args, None).from_hf(hf)
    with torch.device(device):
        model = DeepSeekV3Model(args)
    model.load_state_dict(sd, strict=True)  # every parameter and persistent buffer from the checkpoint
    return model.to(device)


def titan_loss(attn: str = "sdpa"):
    "The step's loss function: cross-entropy of torchtitan's logits in fp32 (as its `cross_entropy_loss`), no MTP."
    def loss_fn(model, x: torch.Tensor, y: torch.Tensor) -> LossParts:
        masks = model.get_attention_masks(x, None) if attn == "flex" else None  # "causal": one block mask
        logits = model(x, masks)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(0, 1))
        zero = loss.new_zeros(())
        return LossParts(loss, loss, zero, zero)
    return loss_fn


class OneDevice:
    "What torchtitan's balancing hook asks of `ParallelDims` on one device without a process group: no mesh at all."
    ep_enabled, tp = False, 1

    def get_optional_mesh(self, dims, **kw):
        "No mesh: every axis has size 1 (`ParallelDims` drops those; a real one would need `init_process_group`)."
        return None


def balancing_hook(model, opt: torch.optim.Optimizer) -> None:
    """torchtitan's aux-loss-free bias update: the step pre-hook its `build_optimizers_with_moe_load_balancing`
    registers on its optimizer container (a closure reachable only there), registered on `opt` instead."""
    from torchtitan.components.optimizer import build_optimizers_with_moe_load_balancing
    from torchtitan.config.job_config import Optimizer
    container = build_optimizers_with_moe_load_balancing([model], Optimizer(implementation="for-loop"), OneDevice())
    for hook in container._optimizer_step_pre_hooks.values():
        opt.register_step_pre_hook(hook)


def titan_step(model, tc, device: torch.device, tokens, attn: str = "sdpa"):
    "The package's `train_step` on torchtitan's model: `torch.compile(model)` with `tc.compile`, fused AdamW as ours."
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay,
                            fused=device.type == "cuda")
    balancing_hook(model, opt)
    compiled, autocast = torch.compile(model) if tc.compile else model, autocast_for(tc, device)
    healthy, loss_fn = torch.ones((), dtype=torch.bool, device=device), titan_loss(attn)

    def step(i):
        x, y = get_batch(tokens, i, tc.batch_size, tc.seq_len, tc.seed, device=device)
        with CpuHistc() if device.type == "cpu" else contextlib.nullcontext():  # a CPU smoke test only
            return train_step(compiled, opt, [(x, y)], loss_fn, tc.lr, tc.grad_clip, autocast, healthy=healthy)
    return step


class CpuHistc(torch.overrides.TorchFunctionMode):
    """torchtitan 0.2.2's router counts tokens per expert with `torch.histc` on int64 ids, which has a CUDA kernel but
    no CPU one; inside this mode (on the CPU only) that count is `torch.bincount`, the same numbers."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.histc and not args[0].is_floating_point() and not args[0].is_cuda:
            bins = kwargs.get("bins", args[1] if len(args) > 1 else 100)
            return torch.bincount(args[0], minlength=bins)[:bins]  # histc keeps the input dtype
        return func(*args, **kwargs)


# about 10x the errors measured on CPU (torch 2.13, torchtitan 0.2.2, fp32, its for-loop experts)
TOLERANCES = {"router_weight_max_abs": 1e-6, "attention_max_abs": 2e-8, "moe_rel": 1e-6,
              "logits_same_final_eps_max_abs": 2e-6}


def _routes(routers) -> dict:
    "Forward hooks keeping each router's expert ids (sorted per token) by layer name."
    out = {}

    def keep(name):
        return lambda m, i, o: out.__setitem__(name, o[1].reshape(-1, o[1].shape[-1]).sort(-1).values)
    for name, r in routers:
        r.register_forward_hook(keep(name))
    return out


@torch.no_grad()
def _layers(ours, titan, cfg) -> dict:
    "The router, the first attention and the first MoE of both models on the same random input."
    moe, tmoe = ours.layers[cfg.first_k_dense_replace].mlp, titan.layers[str(cfg.first_k_dense_replace)].moe
    x = torch.randn(2, 32, cfg.hidden_size)
    w, idx, _ = moe.gate(x.flatten(0, 1))
    tw, tidx, _ = tmoe.router(x.flatten(0, 1), tmoe.expert_bias)
    o, to = idx.sort(-1), tidx.sort(-1)
    tw = tw.gather(-1, to.indices)
    cos, sin = ours.rotary(torch.arange(32))
    attn = ours.layers[0].self_attn(x, cos, sin) - titan.layers["0"].attention(x, titan.freqs_cis, None)
    y = moe(x)
    return {"router_ids_equal": bool(torch.equal(o.values, to.values)),
            "router_weight_max_abs": float((w.gather(-1, o.indices) - tw).abs().max()),
            "attention_max_abs": float(attn.abs().max()), "moe_rel": float((y - tmoe(x)).abs().max() / y.abs().max())}


@torch.no_grad()
def _logits(ours, titan, cfg) -> dict:
    """Logits on random ids, over the tokens whose experts agree in every layer (the flips are counted): as torchtitan
    ships (its final norm's eps is torch's default) and with that eps set to ours (everything else equal)."""
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    r = _routes([(str(i), b.mlp.gate) for i, b in enumerate(ours.layers) if cfg.is_moe_layer(i)])
    tr = _routes([(k, b.moe.router) for k, b in titan.layers.items() if b.moe_enabled])
    logits = ours(ids)
    err = (logits - titan(ids)).abs().amax(-1).flatten()
    agree = torch.stack([(r[k] == tr[k]).all(-1) for k in r]).all(0)
    titan.norm.eps = cfg.rms_norm_eps
    same_eps = (logits - titan(ids)).abs().amax(-1).flatten()
    return {"tokens_flipped": int((~agree).sum()), "tokens": agree.numel(), "logits_max": float(logits.abs().max()),
            "logits_as_shipped_max_abs": float(err[agree].max()),
            "logits_same_final_eps_max_abs": float(same_eps[agree].max())}


def check(seed: int = 0) -> dict:
    """fp32 on CPU, test-tiny with MTP off, torchtitan against ours on the same weights: the router (exact), one MLA
    layer (exact), one MoE layer (torchtitan's experts run in bf16: relative error) and the logits of the tokens whose
    experts agree in every layer (a bf16 difference upstream can flip a near-tied choice; the flips are counted)."""
    torch.manual_seed(seed)
    cfg = get_preset("test-tiny", num_nextn_predict_layers=0)
    ours = DeepSeekV3(cfg).eval()
    with torch.no_grad():  # router biases that change the choice, so that the bias path is checked
        for m in ours.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp)
        titan = load_titan(tmp, cfg, seq_len=32, grouped_mm=False).eval()  # its grouped path pads with Triton
    with CpuHistc():
        out = {**_layers(ours, titan, cfg), **_logits(ours, titan, cfg)}
    out["passed"] = out["router_ids_equal"] and all(out[k] <= t for k, t in TOLERANCES.items())
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="the CPU parity self-check against our model")
    a = ap.parse_args()
    if a.check:
        res = check()
        print(res)
        sys.exit(0 if res["passed"] else 1)
