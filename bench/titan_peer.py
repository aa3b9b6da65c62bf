"""torchtitan's DeepSeek-V3 as a second training peer of `bench/train_throughput.py` (issue 27, item 1).

Our model saved as a transformers checkpoint (`hf.save_pretrained`) is loaded into torchtitan's own
`DeepSeekV3Model` through torchtitan's `DeepSeekV3StateDictAdapter.from_hf`, with model arguments built by
torchtitan's `_build_dsv3_layers` from our `ModelConfig` (`titan_config`), and trained by the package's
`step.train_step` on the same batches: fp32 weights under bf16 autocast (what torchtitan itself does on one GPU
without FSDP; its grouped experts cast to bf16 inside), plain `torch.compile(model)`, fused AdamW, and torchtitan's
own aux-loss-free bias update (`register_moe_load_balancing_hook`, an optimizer pre-hook).

Equivalent arguments: sigmoid router, `route_norm` = norm_topk_prob, `route_scale` = routed_scaling_factor, expert
groups = n_group / topk_group (none when n_group is 1), `load_balance_coeff` = bias_update_speed, ComplexRoPE with
consecutive pairs and no scaling, MLA softmax scale qk_head_dim**-0.5, RMSNorm eps = rms_norm_eps (torchtitan's
builder leaves its own default, 1e-5, where DeepSeek-V3 has 1e-6: set here), SDPA attention (cuDNN first; torchtitan's
language models default to FlexAttention with document masks, `attn="flex"` picks it; our batches have no documents).

`python bench/titan_peer.py --check`: the CPU self-check (fp32, test-tiny with MTP off): the router's weights and
expert ids, one attention layer's output and the whole model's logits of torchtitan against ours on the same weights.

Wheels (torchtitan 0.3.0 imports its model with `--no-deps` plus three of its dependencies; the GPU machine has
torch, einops, safetensors, typing-extensions already; tyro's typeguard is not imported):
torchtitan==0.3.0 tyro==1.0.17 docstring_parser==0.18.0 spmd_types==0.2.3. Download them here (python 3.12, x86_64):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl torchtitan==0.3.0 tyro==1.0.17 docstring_parser==0.18.0 spmd_types==0.2.3

and start the GPU call (carry `.whl`) with
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
"""
from __future__ import annotations

import argparse
import dataclasses
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


def _set_eps(node, eps: float) -> None:
    "Every RMSNorm config under `node` (dataclasses and lists) gets `eps`."
    from torchtitan.models.common import RMSNorm
    if isinstance(node, RMSNorm.Config):
        node.eps = eps
    elif isinstance(node, list):
        for n in node:
            _set_eps(n, eps)
    elif dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _set_eps(getattr(node, f.name), eps)


def titan_config(cfg: ModelConfig, seq_len: int, attn: str = "sdpa"):
    "torchtitan's `DeepSeekV3Model.Config` with the arguments of our `cfg` (MTP off), built by its own builder."
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model, _build_dsv3_layers
    if cfg.attention != "mla" or cfg.norm_scheme != "prenorm" or cfg.gated_attention:
        raise ValueError("torchtitan runs DeepSeek-V3's own architecture only (MLA, pre-norm, no gates)")
    groups = cfg.n_group if cfg.n_group > 1 else None
    layers = _build_dsv3_layers(
        n_layers=cfg.num_hidden_layers, n_dense_layers=cfg.first_k_dense_replace, dim=cfg.hidden_size,
        n_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        mscale=1.0, dense_hidden_dim=cfg.intermediate_size, moe_hidden_dim=cfg.moe_intermediate_size,
        num_experts=cfg.n_routed_experts, num_shared_experts=cfg.n_shared_experts,
        router_top_k=cfg.num_experts_per_tok, router_score_func="sigmoid", router_num_expert_groups=groups,
        router_num_limited_groups=cfg.topk_group if groups else None, router_route_scale=cfg.routed_scaling_factor,
        router_route_norm=cfg.norm_topk_prob, attn_backend="flex", moe_comm_backend="standard",
        non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(dim=cfg.qk_rope_head_dim, max_seq_len=seq_len, theta=cfg.rope_theta))
    for layer in layers:
        if attn == "sdpa":
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
        if layer.moe is not None:
            layer.moe.load_balance_coeff = cfg.bias_update_speed
    mc = DeepSeekV3Model.Config(
        vocab_size=cfg.vocab_size, dim=cfg.hidden_size, layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=cfg.vocab_size, embedding_dim=cfg.hidden_size),
        norm=RMSNorm.Config(normalized_shape=cfg.hidden_size),
        lm_head=Linear.Config(in_features=cfg.hidden_size, out_features=cfg.vocab_size))
    _set_eps(mc, cfg.rms_norm_eps)
    return mc


def load_titan(path, cfg: ModelConfig, seq_len: int, attn: str = "sdpa", device="cpu"):
    "torchtitan's DeepSeek-V3 holding the weights of the transformers checkpoint at `path` (its adapter's `from_hf`)."
    from torchtitan.models.deepseek_v3 import DeepSeekV3StateDictAdapter
    mc = titan_config(cfg, seq_len, attn)
    hf = {k: v for f in sorted(Path(path).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    sd = DeepSeekV3StateDictAdapter(mc, None).from_hf(hf)
    with torch.device(device):
        model = mc.build()
    model.load_state_dict(sd, strict=True)  # every parameter and persistent buffer from the checkpoint
    return model.to(device)


def titan_loss(attn: str = "sdpa"):
    "The step's loss function: cross-entropy of torchtitan's logits in fp32 (as its `cross_entropy_loss`), no MTP."
    def loss_fn(model, x: torch.Tensor, y: torch.Tensor) -> LossParts:
        positions = masks = None
        if attn == "flex":  # FlexAttention takes a block mask built from the positions (one document per row)
            positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
            masks = model.get_attention_masks(positions)
        logits = model(x, positions, masks)
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
    "torchtitan's aux-loss-free bias update as it registers it (an optimizer pre-hook on this step's counts)."
    from torchtitan.components.optimizer.optimizer import register_moe_load_balancing_hook
    register_moe_load_balancing_hook(opt, [model], OneDevice())


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
        return train_step(compiled, opt, [(x, y)], loss_fn, tc.lr, tc.grad_clip, autocast, healthy=healthy)
    return step


# about 10x the errors measured on CPU (torch 2.13): 0, 1.9e-9, 6.0e-3 (bf16 experts), 6.7e-4 (logits max 0.6)
TOLERANCES = {"router_weight_max_abs": 1e-6, "attention_max_abs": 2e-8, "moe_rel": 5e-2,
              "logits_agreeing_max_abs": 6e-3}


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
    tw, tidx, _ = tmoe.router(x, tmoe.expert_bias_E)
    o, to = idx.sort(-1), tidx.flatten(0, 1).sort(-1)
    tw = tw.flatten(0, 1).gather(-1, to.indices)
    cos, sin = ours.rotary(torch.arange(32))
    attn = ours.layers[0].self_attn(x, cos, sin) - titan.layers["0"].attention(x, None)
    y = moe(x)
    return {"router_ids_equal": bool(torch.equal(o.values, to.values)),
            "router_weight_max_abs": float((w.gather(-1, o.indices) - tw).abs().max()),
            "attention_max_abs": float(attn.abs().max()), "moe_rel": float((y - tmoe(x)).abs().max() / y.abs().max())}


@torch.no_grad()
def _logits(ours, titan, cfg) -> dict:
    "Logits on random ids: the largest error over the tokens whose experts agree in every layer, and the flips."
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    r = _routes([(str(i), b.mlp.gate) for i, b in enumerate(ours.layers) if cfg.is_moe_layer(i)])
    tr = _routes([(k, b.moe.router) for k, b in titan.layers.items() if b.moe_enabled])
    err = (ours(ids) - titan(ids)).abs().amax(-1).flatten()
    agree = torch.stack([(r[k] == tr[k]).all(-1) for k in r]).all(0)
    return {"tokens_flipped": int((~agree).sum()), "tokens": agree.numel(),
            "logits_agreeing_max_abs": float(err[agree].max()), "logits_all_max_abs": float(err.max())}


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
        titan = load_titan(tmp, cfg, seq_len=32).eval()
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
