"""PEFT / LoRA on patched models: routers stay out of LoRA, train fully, save and restore with the adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper

from star_hf import StarConfig, find_star_routers, fold, gha_step, patch_model
from star_hf.integrations.peft import StarModulesToSaveWrapper
from star_hf.router.star_router import StarGateHostMixin, StarRouterMixin

from .conftest import COMMON, tiny_mixtral, tiny_qwen2_moe, tiny_switch

ROUTER_TENSORS = ("star_linear_weight", "star_linear_bias", "star_mixing", "star_alpha", "star_basis")
TRAINED_BY_GRADIENT = ("star_linear_weight", "star_mixing", "star_alpha")


def tiny_phimoe():
    from transformers import PhimoeConfig, PhimoeForCausalLM

    torch.manual_seed(0)
    return PhimoeForCausalLM(PhimoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)).eval()


def tiny_llama4():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    extra = {"intermediate_size_mlp": 64, "head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 1}
    cfg = Llama4TextConfig(**COMMON, **extra, interleave_moe_layer_step=1, attention_chunk_size=16)
    return Llama4ForCausalLM(cfg).eval()


def tiny_longcat_flash():
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    torch.manual_seed(0)
    attention = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "head_dim": 8}
    cfg = LongcatFlashConfig(
        **{
            k: v
            for k, v in COMMON.items()
            if k not in ("num_hidden_layers", "intermediate_size", "num_key_value_heads")
        },
        num_layers=1,
        num_key_value_heads=4,
        ffn_hidden_size=64,
        **attention,
        v_head_dim=8,
        moe_topk=2,
        n_routed_experts=4,
        zero_expert_num=2,
        expert_ffn_hidden_size=32,
    )
    return LongcatFlashForCausalLM(cfg).eval()


BUILDERS = {
    "mixtral": tiny_mixtral,
    "qwen2_moe": tiny_qwen2_moe,
    "switch": tiny_switch,
    "phimoe": tiny_phimoe,
    "llama4": tiny_llama4,
    "longcat_flash": tiny_longcat_flash,
}
# Not in the verified list. PhiMoE's and Llama4's routers subclass nn.Linear, which "all-linear" would
# catch; Longcat-Flash's router reads its child gate's weight directly, so the router is kept whole.
UNVERIFIED = ("phimoe", "llama4", "longcat_flash")


def patched(name: str, config: StarConfig | None = None, **overrides):
    return patch_model(BUILDERS[name](**overrides), config, allow_unverified=name in UNVERIFIED)


def lora(model, **kwargs) -> PeftModel:
    return get_peft_model(model, LoraConfig(**{"r": 2, "lora_alpha": 4, **kwargs}))


def batch(name: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (2, 12), generator=g)
    if name == "switch":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, 128, (2, 7), generator=g)}
    return {"input_ids": ids}


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def router_state(router) -> dict[str, torch.Tensor | None]:
    return {n: None if getattr(router, n) is None else getattr(router, n).detach().clone() for n in ROUTER_TENSORS}


def perturb_router_copies(peft_model) -> None:
    """Stand-in for training: move every trained tensor of the active router copies."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for router in find_star_routers(peft_model).values():
            for name in ROUTER_TENSORS:
                t = getattr(router, name)
                if t is not None:
                    t.add_(0.1 * torch.randn(t.shape, generator=g))


def adapter_layer_paths(model) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def assert_routers_out_of_lora(peft_model) -> None:
    """No LoRA layer on, inside or around a router; every router runs as a trainable copy."""
    wrappers = {p: m for p, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    routers = find_star_routers(peft_model)
    assert routers
    for path, router in routers.items():
        wrapper_path = path.rsplit(".modules_to_save.", 1)[0]
        assert isinstance(wrappers.get(wrapper_path), StarModulesToSaveWrapper), path
        for lora_path in adapter_layer_paths(peft_model):
            assert not lora_path.startswith(wrapper_path + ".") and not wrapper_path.startswith(lora_path + ".")
        for name in TRAINED_BY_GRADIENT:
            assert getattr(router, name).requires_grad, f"{path}.{name}"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_all_linear_leaves_routers_to_full_training_and_merge_fold_keeps_outputs(name):
    model = patched(name)
    inputs = batch(name)
    before = logits(model, inputs)
    # Random LoRA B (instead of zeros) so that the adapter changes the outputs from the start.
    hosts = [p for p, m in model.named_modules() if isinstance(m, StarGateHostMixin)]
    peft_model = lora(model, target_modules="all-linear", init_lora_weights=False)
    assert adapter_layer_paths(peft_model), "all-linear adapted nothing"
    assert_routers_out_of_lora(peft_model)
    if name == "longcat_flash":
        assert hosts and peft_model.peft_config["default"].modules_to_save == hosts
    perturb_router_copies(peft_model)
    peft_model.eval()
    expected = logits(peft_model, inputs)
    assert not torch.allclose(expected, before, atol=1e-3)

    merged = peft_model.merge_and_unload()
    assert not adapter_layer_paths(merged) and not any(isinstance(m, ModulesToSaveWrapper) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-5, atol=1e-5)
    fold(merged)
    assert not any(isinstance(m, (StarRouterMixin, StarGateHostMixin)) for m in merged.modules())
    assert merged.state_dict().keys() == BUILDERS[name]().state_dict().keys()
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-5, atol=1e-5)


def naive_sanger(basis: torch.Tensor, x: torch.Tensor, lr: float) -> torch.Tensor:
    """Sanger's rule token by token (deflation written out), then row normalisation."""
    delta = torch.zeros_like(basis, dtype=torch.float64)
    b = basis.double()
    for xn in x.double():
        y = b @ xn
        for k in range(b.shape[0]):
            delta[k] += y[k] * (xn - (y[: k + 1, None] * b[: k + 1]).sum(0))
    new = b + lr * delta / x.shape[0]
    return (new / new.norm(dim=1, keepdim=True)).float()


def test_lora_on_attention_trains_the_active_router_copies_and_gha_reaches_them():
    peft_model = lora(patched("mixtral"), target_modules=["q_proj", "v_proj"])
    assert_routers_out_of_lora(peft_model)
    routers = find_star_routers(peft_model)
    assert all(p.endswith(".mlp.gate.modules_to_save.default") for p in routers)
    wrappers = [m for m in peft_model.modules() if isinstance(m, ModulesToSaveWrapper)]
    originals = [w.original_module for w in wrappers]
    original_bases = [o.star_basis.clone() for o in originals]
    assert all(not p.requires_grad for o in originals for p in o.parameters())

    seen: dict[str, torch.Tensor] = {}
    hooks = [
        r.register_forward_pre_hook(lambda m, args, p=p: seen.__setitem__(p, args[0].detach().reshape(-1, 32)))
        for p, r in routers.items()
    ]
    peft_model.train()
    inputs = batch("mixtral")
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for hook in hooks:
        hook.remove()
    for path, router in routers.items():
        for name in TRAINED_BY_GRADIENT:
            grad = getattr(router, name).grad
            assert grad is not None and grad.abs().sum() > 0, f"{path}.{name}"
        assert router.star_pending_statistics.count.item() == 24

    bases = {p: r.star_basis.clone() for p, r in routers.items()}
    assert gha_step(peft_model, lr=0.05) == 2
    for path, router in routers.items():
        torch.testing.assert_close(router.star_basis, naive_sanger(bases[path], seen[path], 0.05), rtol=1e-5, atol=1e-6)
    for original, basis in zip(originals, original_bases):
        assert all(p.grad is None for p in original.parameters())
        assert torch.equal(original.star_basis, basis) and original.star_pending_statistics is None

    with peft_model.disable_adapter():
        assert all(p.endswith(".mlp.gate.original_module") for p in find_star_routers(peft_model))


def test_padding_reaches_the_router_copies():
    peft_model = lora(patched("qwen2_moe"), target_modules=["q_proj"])
    peft_model.train()
    inputs = batch("qwen2_moe")
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, :5] = 0
    peft_model(**inputs, attention_mask=mask)
    for router in find_star_routers(peft_model).values():
        assert router.star_pending_statistics.count.item() == mask.sum().item()


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_lora_on_fused_experts_through_target_parameters(name):
    # Transformers 5 fuses these experts into 3-D parameters; PEFT 0.21 adapts them as parameters.
    model = patched(name)
    inputs = batch(name)
    before = logits(model, inputs)
    peft_model = lora(
        model, target_modules=[], target_parameters=["gate_up_proj", "down_proj"], init_lora_weights=False
    )
    adapted = adapter_layer_paths(peft_model)
    assert adapted and all(".mlp.experts" in p for p in adapted)
    assert_routers_out_of_lora(peft_model)
    perturb_router_copies(peft_model)
    peft_model.eval()
    expected = logits(peft_model, inputs)
    assert not torch.allclose(expected, before, atol=1e-3)
    stock = fold(peft_model.merge_and_unload())
    torch.testing.assert_close(logits(stock, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "targets"), [("mixtral", ["gate", "q_proj"]), ("switch", ["classifier", "q"])])
def test_naming_a_router_in_target_modules_warns_and_trains_it_fully(name, targets):
    with pytest.warns(UserWarning, match="not LoRA-adapted"):
        peft_model = lora(patched(name), target_modules=targets)
    assert_routers_out_of_lora(peft_model)
    assert adapter_layer_paths(peft_model)


def test_gha_only_routers_keep_w_b_alpha_frozen_whatever_peft_toggles():
    peft_model = lora(patched("switch", StarConfig(gha_only=True), router_bias=True), target_modules=["q", "v"])

    def check():
        for router in find_star_routers(peft_model).values():
            assert router.star_mixing.requires_grad
            assert not any(
                getattr(router, n).requires_grad for n in ("star_linear_weight", "star_linear_bias", "star_alpha")
            )

    check()
    with peft_model.disable_adapter():
        pass
    check()
    peft_model.set_adapter("default")
    check()


def train_steps(peft_model, name: str, steps: int) -> None:
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        inputs = batch(name, seed=10 + step)
        labels = inputs.get("decoder_input_ids", inputs["input_ids"])
        peft_model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert gha_step(peft_model, lr=0.05) == len(find_star_routers(peft_model))
    peft_model.eval()


def assert_adapter_restored(trained: PeftModel, restored: PeftModel, name: str, initial: dict) -> None:
    pairs = list(zip(find_star_routers(trained).items(), find_star_routers(restored).items()))
    assert pairs and all(p == q for (p, _), (q, _) in pairs)
    for (path, a), (_, b) in pairs:
        state_a, state_b = router_state(a), router_state(b)
        assert not torch.equal(state_a["star_basis"], initial[path]["star_basis"]), "the basis never moved"
        for key, value in state_a.items():
            assert (value is None and state_b[key] is None) or torch.equal(value, state_b[key]), f"{path}.{key}"
    lora_a = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    lora_b = {k: v for k, v in restored.state_dict().items() if "lora_" in k}
    assert lora_a and lora_a.keys() == lora_b.keys() and all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    inputs = batch(name, seed=99)
    torch.testing.assert_close(logits(restored, inputs), logits(trained, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["qwen2_moe", "switch"])
def test_custom_loop_save_and_restore_on_a_freshly_patched_base(name, tmp_path):
    peft_model = lora(patched(name), target_modules="all-linear")
    initial = {p: router_state(r) for p, r in find_star_routers(peft_model).items()}
    train_steps(peft_model, name, steps=3)
    peft_model.save_pretrained(tmp_path)

    restored = PeftModel.from_pretrained(patched(name), tmp_path)
    assert_adapter_restored(peft_model, restored, name, initial)
    # Loaded for inference by default; is_trainable=True trains the routers again.
    assert not any(p.requires_grad for r in find_star_routers(restored).values() for p in r.parameters())
    trainable = PeftModel.from_pretrained(patched(name), tmp_path, is_trainable=True)
    assert_routers_out_of_lora(trainable)


def test_trainer_with_star_callback_trains_resumes_saves_and_restores(tmp_path):
    from transformers import Trainer, TrainingArguments

    from star_hf import StarCallback

    def run(resume: bool) -> PeftModel:
        peft_model = lora(patched("mixtral", StarConfig(gha_lr=0.05)), target_modules=["q_proj", "v_proj"])
        g = torch.Generator().manual_seed(3)
        data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, 128, (8, 12), generator=g)]
        args = TrainingArguments(
            output_dir=str(tmp_path / ("resumed" if resume else "run")),
            max_steps=4,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            use_cpu=True,
            report_to=[],
            save_strategy="no" if resume else "steps",
            save_steps=2,
            logging_steps=1,
            disable_tqdm=True,
        )
        trainer = Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[StarCallback()])
        if not resume:
            optimized = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
            for router in find_star_routers(peft_model).values():
                assert all(id(getattr(router, n)) in optimized for n in TRAINED_BY_GRADIENT)
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2") if resume else None)
        return peft_model.eval()

    untrained = lora(patched("mixtral", StarConfig(gha_lr=0.05)), target_modules=["q_proj"])
    initial = {p: router_state(r) for p, r in find_star_routers(untrained).items()}
    trained = run(resume=False)
    # Trainer checkpoints of a PeftModel are adapters: they carry the routers, so a resume is exact.
    assert_adapter_restored(trained, run(resume=True), "mixtral", initial)

    trained.save_pretrained(tmp_path / "adapter")
    restored = PeftModel.from_pretrained(patched("mixtral", StarConfig(gha_lr=0.05)), tmp_path / "adapter")
    assert_adapter_restored(trained, restored, "mixtral", initial)


def test_each_adapter_trains_its_own_router_copies():
    peft_model = lora(patched("mixtral"), target_modules=["q_proj"])
    peft_model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"]))
    assert peft_model.peft_config["second"].modules_to_save == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    first = {p: router_state(r) for p, r in find_star_routers(peft_model).items()}
    peft_model.set_adapter("second")
    routers = find_star_routers(peft_model)
    assert all(p.endswith(".modules_to_save.second") for p in routers)
    assert_routers_out_of_lora(peft_model)
    config = peft_model.base_model.model.model.layers[0].mlp.gate.original_module.star_config
    assert all(r.star_config is config for r in routers.values())
    second = {p: router_state(r) for p, r in routers.items()}
    train_steps(peft_model, "mixtral", steps=1)
    for path, router in find_star_routers(peft_model).items():
        assert not torch.equal(router.star_basis, second[path]["star_basis"])
    peft_model.set_adapter("default")
    for path, router in find_star_routers(peft_model).items():
        assert all(torch.equal(router_state(router)[k], first[path][k]) for k in ("star_basis", "star_mixing"))


def test_patching_a_peft_wrapped_model_saves_its_routers_with_the_adapter(tmp_path):
    original = tiny_mixtral()
    peft_model = lora(copy.deepcopy(original), target_modules=["q_proj"])
    patch_model(peft_model)
    assert peft_model.peft_config["default"].modules_to_save == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert_routers_out_of_lora(peft_model)
    inputs = batch("mixtral")
    torch.testing.assert_close(logits(peft_model, inputs), logits(original, inputs), rtol=1e-5, atol=1e-5)
    initial = {p: router_state(r) for p, r in find_star_routers(peft_model).items()}
    train_steps(peft_model, "mixtral", steps=2)
    peft_model.save_pretrained(tmp_path)
    assert_adapter_restored(peft_model, PeftModel.from_pretrained(patched("mixtral"), tmp_path), "mixtral", initial)


def test_patching_a_model_with_several_adapters_gives_each_its_router_copies():
    peft_model = lora(tiny_mixtral(), target_modules=["q_proj"])
    peft_model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"]))
    peft_model.set_adapter("second")
    patch_model(peft_model)
    paths = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert all(config.modules_to_save == paths for config in peft_model.peft_config.values())
    assert all(p.endswith(".modules_to_save.second") for p in find_star_routers(peft_model))
    assert_routers_out_of_lora(peft_model)
    peft_model.set_adapter("default")
    assert all(p.endswith(".modules_to_save.default") for p in find_star_routers(peft_model))
    # A wrapper whose copies are all inactive runs its original, and that is the router reported.
    peft_model.base_model.model.model.layers[0].mlp.gate.set_adapter([])
    assert next(iter(find_star_routers(peft_model))).endswith("layers.0.mlp.gate.original_module")


def test_patching_refuses_routers_peft_already_adapted():
    # Added before patching, "all-linear" puts a LoRA layer on Mixtral's router weight.
    peft_model = lora(tiny_mixtral(), target_modules="all-linear")
    with pytest.raises(ValueError, match="Patch the base model before adding the adapter"):
        patch_model(peft_model)
    assert not any(isinstance(m, (StarRouterMixin, StarGateHostMixin)) for m in peft_model.modules())


def test_loading_into_an_unpatched_base_warns_and_keeps_the_folded_gates(tmp_path):
    peft_model = lora(patched("mixtral"), target_modules=["q_proj"])
    perturb_router_copies(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="has no STAR routers"):
        restored = PeftModel.from_pretrained(tiny_mixtral(), tmp_path)
    inputs = batch("mixtral")
    torch.testing.assert_close(logits(restored, inputs), logits(peft_model, inputs), rtol=1e-5, atol=1e-5)


def test_models_without_star_routers_are_left_to_peft():
    peft_model = lora(tiny_mixtral(), target_modules=["q_proj"])
    assert peft_model.peft_config["default"].modules_to_save is None
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in peft_model.modules())


def test_transformers_add_adapter_keeps_routers_trainable():
    """Transformers' ``model.add_adapter`` needs the PEFT release it names (``MIN_PEFT_VERSION``;
    0.22 on Transformers 5.24, which is not released yet). With an older PEFT it refuses the stock
    model and the patched one with the same error, and the patched model stays as it was."""
    import peft
    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    model = patched("mixtral")
    if Version(peft.__version__) < Version(MIN_PEFT_VERSION):
        with pytest.raises(ValueError) as stock_error:
            tiny_mixtral().add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))
        assert MIN_PEFT_VERSION in str(stock_error.value)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError) as error:
            model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))
        assert str(error.value) == str(stock_error.value)
        assert not getattr(model, "_hf_peft_config_loaded", False)
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.peft_config["default"].modules_to_save == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    routers = find_star_routers(model)
    assert len(routers) == 2 and all(r.star_mixing.requires_grad for r in routers.values())
