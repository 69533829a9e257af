import pytest
import torch
from torch import nn

from runtime.families import LLAMA_LINEARS
from sasq_edge.config import QuantConfig
from sasq_edge.errors import ConfigError
from sasq_edge.modules import QuantLinear, prepare, quant_linears, quant_mode, scale_parameters, set_mode


def test_prepare_swaps_exactly_the_decoder_linears(tiny, config):
    originals = {n: m.weight for n, m in tiny.model.named_modules() if isinstance(m, nn.Linear)}
    prepare(tiny.model, config)
    names = [n for n, _ in quant_linears(tiny.model)]
    assert len(names) == 2 * len(LLAMA_LINEARS)  # 2 layers x 7 projections
    assert {n.rsplit(".", 1)[-1] for n in names} == set(LLAMA_LINEARS)
    assert type(tiny.model.lm_head) is nn.Linear  # stays float by default
    for n, m in quant_linears(tiny.model):
        assert m.weight is originals[n]  # the same Parameter object: nothing copied
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert len(scale_parameters(tiny.model)) == len(names)


def test_weight_codes_and_error_bound(tiny, config):
    prepare(tiny.model, config)
    for _, m in quant_linears(tiny.model):
        assert m.weight_int.dtype == torch.int8
        assert int(m.weight_int.min()) >= -127 and int(m.weight_int.max()) <= 127
        err = (m.weight_dq - m.weight).abs()  # (N, K)
        # half a step bounds round-to-nearest; 1e-8 > the float32 rounding of q * s for |w| < 0.125 (measured max |w| 0.085)
        assert bool((err <= m.weight_scale[:, None] / 2 + 1e-8).all())
        assert int(m.weight_int.abs().amax(dim=1).min()) == 127  # every row uses the full range


def test_float_mode_is_the_float_model(tiny, config, windows):
    ids = windows[:2]
    with torch.no_grad():
        ref = tiny.model(input_ids=ids).logits
        prepare(tiny.model, config)
        out = tiny.model(input_ids=ids).logits
    assert torch.equal(ref, out)


def test_fake_mode_changes_output_and_modes_restore(tiny, config, windows):
    prepare(tiny.model, config)
    set_mode(tiny.model, "fake")
    with quant_mode(tiny.model, "float"):
        assert all(m.mode == "float" for _, m in quant_linears(tiny.model))
    assert all(m.mode == "fake" for _, m in quant_linears(tiny.model))


def test_bad_targets_and_double_prepare(tiny):
    with pytest.raises(ConfigError, match="q_prj"):
        prepare(tiny.model, QuantConfig.plain(targets=("q_prj",)))
    prepare(tiny.model, QuantConfig.plain(targets=("down_proj",)))
    assert [n for n, _ in quant_linears(tiny.model)][0].endswith("down_proj")
    with pytest.raises(ConfigError, match="already prepared"):
        prepare(tiny.model, QuantConfig.plain())


def test_quantlinear_is_a_linear(tiny, config):
    prepare(tiny.model, config)
    m = tiny.model.model.layers[0].self_attn.q_proj
    assert isinstance(m, QuantLinear) and isinstance(m, nn.Linear)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"profile": "tensorrt"}, "unknown deploy profile"),
        ({"smooth_alpha": 1.5}, "must be a number in"),
        ({"percentile": 20.0}, "percentile=20.0"),
        ({"calibration": "kl"}, "unknown calibration"),
        ({"truncation": "hard"}, "unknown truncation"),
        ({"seq_len": 0}, "seq_len=0"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"train_steps": -1}, "train_steps=-1"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig.plain(**kwargs)


def test_config_from_dict_is_strict():
    d = QuantConfig.plain(targets=("q_proj",)).to_dict()
    assert QuantConfig.from_dict(d) == QuantConfig.plain(targets=("q_proj",))
    with pytest.raises(ConfigError, match="learning_rate"):
        QuantConfig.from_dict({**d, "learning_rate": 1e-3})
