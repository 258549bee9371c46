"""Caffe file formats: prototxt text (parser, writer, Caffe view) and binary caffemodel."""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_nvdla.caffe.caffemodel import (
    CaffeModel,
    decode_caffemodel,
    decode_message,
    decode_varint,
    encode_caffemodel,
    encode_message,
    encode_varint,
    read_caffemodel,
    write_caffemodel,
)
from torch_nvdla.caffe.prototxt import (
    CaffeLayer,
    CaffeNet,
    EnumValue,
    Message,
    format_prototxt,
    parse_prototxt,
    parse_text_message,
    write_prototxt,
)
from torch_nvdla.errors import FileFormatError

LENET_LAYERS = [
    # name, type, bottoms, tops
    ("data", "Input", [], ["data"]),
    ("conv1", "Convolution", ["data"], ["conv1"]),
    ("pool1", "Pooling", ["conv1"], ["pool1"]),
    ("conv2", "Convolution", ["pool1"], ["conv2"]),
    ("pool2", "Pooling", ["conv2"], ["pool2"]),
    ("ip1", "InnerProduct", ["pool2"], ["ip1"]),
    ("relu1", "ReLU", ["ip1"], ["ip1"]),
    ("ip2", "InnerProduct", ["ip1"], ["ip2"]),
    ("prob", "Softmax", ["ip2"], ["prob"]),
]


@pytest.fixture(scope="module")
def lenet_dir(shared_data):
    """The BVLC LeNet folder of the real data (the test skips when it is absent)."""
    return shared_data / "caffe-lenet-mnist"


# ---------------------------------------------------------------------------------
# real LeNet files


def test_lenet_prototxt_structure(lenet_dir):
    net = parse_prototxt(lenet_dir / "lenet.prototxt")
    assert net.name == "LeNet"
    assert [(l.name, l.type, l.bottoms, l.tops) for l in net.layers] == LENET_LAYERS
    assert net.inputs == {"data": (64, 1, 28, 28)}
    assert net.blobs_in_order() == [
        "data",
        "conv1",
        "pool1",
        "conv2",
        "pool2",
        "ip1",
        "ip2",
        "prob",
    ]

    conv1 = net.layer("conv1")
    assert conv1.type_params.get("num_output") == 20
    assert conv1.type_params.get_all("kernel_size") == [5]
    assert conv1.type_params.get_message("weight_filler").get("type") == "xavier"
    assert [p.get("lr_mult") for p in conv1.params.get_all("param")] == [1, 2]
    assert net.layer("conv2").type_params.get("num_output") == 50
    pool1 = net.layer("pool1").type_params
    assert pool1.get("pool") == EnumValue("MAX") and isinstance(pool1.get("pool"), EnumValue)
    assert (pool1.get("kernel_size"), pool1.get("stride")) == (2, 2)
    assert net.layer("ip1").type_params.get("num_output") == 500
    assert net.layer("ip2").type_params.get("num_output") == 10
    relu = net.layer("relu1")
    assert relu.bottoms == relu.tops == ["ip1"]
    assert len(relu.params) == 0 and relu.blobs == []
    # every layer and field keeps its line
    assert [l.line for l in net.layers] == [2, 8, 31, 42, 65, 76, 97, 103, 124]
    assert conv1.params.get("convolution_param").line_of("num_output") == 20
    assert net.layer("pool1").params.line_of("pooling_param") == 36


def test_lenet_caffemodel_blobs_equal_npz(lenet_dir):
    model = read_caffemodel(lenet_dir / "lenet_iter_10000.caffemodel")
    assert isinstance(model, CaffeModel) and model.name == "LeNet"
    # the snapshot holds the training net: Data layer first, SoftmaxWithLoss last
    assert [l.name for l in model.layers] == [
        "mnist",
        "conv1",
        "pool1",
        "conv2",
        "pool2",
        "ip1",
        "relu1",
        "ip2",
        "loss",
    ]
    assert model.layer("mnist").params.get_message("transform_param").get("scale") == 0.00390625
    assert model.layer("pool1").type_params.get("pool") == EnumValue("MAX")
    assert model.layer("relu1").tops == ["ip1"]
    reference = np.load(lenet_dir / "lenet_iter_10000.npz")
    blobs = model.blobs_by_layer()
    assert list(blobs) == ["conv1", "conv2", "ip1", "ip2"]
    seen = set()
    for layer_name, (weight, bias) in blobs.items():
        for suffix, blob in (("weight", weight), ("bias", bias)):
            key = f"{layer_name}.{suffix}"
            expected = reference[key]
            assert blob.dtype == np.float32
            assert blob.shape == expected.shape, key
            assert np.array_equal(blob, expected), key
            seen.add(key)
    assert seen == set(reference.files)


def test_lenet_caffemodel_reencodes_byte_identical(lenet_dir):
    raw = (lenet_dir / "lenet_iter_10000.caffemodel").read_bytes()
    model = decode_caffemodel(raw)
    assert encode_caffemodel(model.name, model.layers) == raw


def test_lenet_prototxt_and_caffemodel_params_agree(lenet_dir):
    net = parse_prototxt(lenet_dir / "lenet.prototxt")
    model = read_caffemodel(lenet_dir / "lenet_iter_10000.caffemodel")
    for layer in net.layers:
        if layer.type in ("Input", "Softmax"):
            continue
        other = model.layer(layer.name)
        assert (other.type, other.bottoms, other.tops) == (layer.type, layer.bottoms, layer.tops)
        assert other.type_params == layer.type_params, layer.name


def test_lenet_prototxt_text_round_trip(lenet_dir, tmp_path):
    net = parse_prototxt(lenet_dir / "lenet.prototxt")
    out = write_prototxt(tmp_path / "deploy.prototxt", net)
    again = parse_prototxt(out)
    assert again == net
    assert again.inputs == net.inputs
    assert format_prototxt(again) == net.to_text()


# ---------------------------------------------------------------------------------
# caffemodel write -> read


def _all_kinds_layers() -> list[CaffeLayer]:
    rng = np.random.default_rng(0)

    def blob(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return [
        CaffeLayer(
            "data", "Input", [], ["data"], {"input_param": {"shape": {"dim": [2, 3, 8, 8]}}}
        ),
        CaffeLayer(
            "conv1",
            "Convolution",
            ["data"],
            ["conv1"],
            Message(
                [
                    ("param", {"lr_mult": 1, "decay_mult": 1}),
                    ("param", {"lr_mult": 2, "decay_mult": 0}),
                ],
                convolution_param={
                    "num_output": 4,
                    "bias_term": True,
                    "pad": [1, 2],
                    "kernel_size": [3, 5],
                    "group": 1,
                    "stride": [1, 2],
                    "dilation": [1, 1],
                    "weight_filler": {
                        "type": "msra",
                        "std": 0.01,
                        "variance_norm": EnumValue("FAN_OUT"),
                    },
                    "engine": EnumValue("CAFFE"),
                    "axis": 1,
                },
            ),
            [blob(4, 3, 3, 5), blob(4)],
        ),
        CaffeLayer(
            "conv2",
            "Convolution",
            ["conv1"],
            ["conv2"],
            {
                "convolution_param": {
                    "num_output": 4,
                    "bias_term": False,
                    "pad_h": 1,
                    "pad_w": 0,
                    "kernel_h": 3,
                    "kernel_w": 1,
                    "stride_h": 2,
                    "stride_w": 1,
                    "group": 2,
                }
            },
            [blob(4, 2, 3, 1)],
        ),
        CaffeLayer(
            "bn",
            "BatchNorm",
            ["conv2"],
            ["conv2"],
            {
                "batch_norm_param": {
                    "use_global_stats": True,
                    "moving_average_fraction": 0.999,
                    "eps": 1e-5,
                }
            },
            [blob(4), np.abs(blob(4)), np.array([1.0], np.float32)],
        ),
        CaffeLayer(
            "scale",
            "Scale",
            ["conv2"],
            ["conv2"],
            {"scale_param": {"axis": 1, "num_axes": 1, "bias_term": True}},
            [blob(4), blob(4)],
        ),
        CaffeLayer("relu", "ReLU", ["conv2"], ["conv2"], {"relu_param": {"negative_slope": 0.1}}),
        CaffeLayer(
            "pool_max",
            "Pooling",
            ["conv2"],
            ["pool_max"],
            {
                "pooling_param": {
                    "pool": EnumValue("MAX"),
                    "kernel_size": 2,
                    "stride": 2,
                    "pad": 0,
                    "round_mode": EnumValue("FLOOR"),
                }
            },
        ),
        CaffeLayer(
            "pool_ave",
            "Pooling",
            ["conv2"],
            ["pool_ave"],
            {
                "pooling_param": {
                    "pool": EnumValue("AVE"),
                    "kernel_h": 3,
                    "kernel_w": 2,
                    "stride_h": 1,
                    "stride_w": 2,
                    "pad_h": 1,
                    "pad_w": 0,
                }
            },
        ),
        CaffeLayer(
            "pool_global",
            "Pooling",
            ["conv2"],
            ["pool_global"],
            {"pooling_param": {"pool": EnumValue("AVE"), "global_pooling": True}},
        ),
        CaffeLayer(
            "sum",
            "Eltwise",
            ["pool_max", "pool_ave"],
            ["sum"],
            {"eltwise_param": {"operation": EnumValue("SUM"), "coeff": [1.0, -0.5]}},
        ),
        CaffeLayer(
            "prod",
            "Eltwise",
            ["pool_max", "pool_ave"],
            ["prod"],
            {"eltwise_param": {"operation": EnumValue("PROD")}},
        ),
        CaffeLayer("cat", "Concat", ["sum", "prod"], ["cat"], {"concat_param": {"axis": 1}}),
        CaffeLayer(
            "flat", "Flatten", ["cat"], ["flat"], {"flatten_param": {"axis": 1, "end_axis": -1}}
        ),
        CaffeLayer(
            "reshape",
            "Reshape",
            ["flat"],
            ["reshape"],
            {"reshape_param": {"shape": {"dim": [0, -1, 1, 1]}, "axis": 0, "num_axes": -1}},
        ),
        CaffeLayer(
            "ip",
            "InnerProduct",
            ["reshape"],
            ["ip"],
            {
                "inner_product_param": {
                    "num_output": 10,
                    "bias_term": True,
                    "axis": 1,
                    "transpose": False,
                }
            },
            [blob(10, 64), blob(10)],
        ),
        CaffeLayer("drop", "Dropout", ["ip"], ["ip"], {"dropout_param": {"dropout_ratio": 0.5}}),
        CaffeLayer(
            "lrn",
            "LRN",
            ["ip"],
            ["lrn"],
            {
                "lrn_param": {
                    "local_size": 5,
                    "alpha": 1e-4,
                    "beta": 0.75,
                    "norm_region": EnumValue("ACROSS_CHANNELS"),
                    "k": 2.0,
                }
            },
        ),
        CaffeLayer(
            "prob",
            "Softmax",
            ["lrn"],
            ["prob"],
            {"softmax_param": {"axis": 1}, "include": {"phase": EnumValue("TEST")}},
        ),
        CaffeLayer(
            "scalar", "Parameter", [], ["scalar"], {}, [np.array(3.5, np.float32), np.zeros((0, 3))]
        ),
    ]


def test_caffemodel_write_read_round_trip_all_param_kinds(tmp_path):
    layers = _all_kinds_layers()
    path = write_caffemodel(tmp_path / "net.caffemodel", "allkinds", layers)
    model = read_caffemodel(path)
    assert model.name == "allkinds"
    assert model.layers == layers
    for got, want in zip(model.layers, layers):
        assert [b.shape for b in got.blobs] == [b.shape for b in want.blobs]
    # enums come back as identifiers, float32 fields as their short decimal
    assert model.layer("pool_ave").type_params.get("pool") == EnumValue("AVE")
    assert model.layer("bn").type_params.get("eps") == 1e-5
    assert model.layer("lrn").type_params.get("alpha") == 1e-4
    assert model.layer("reshape").type_params.get_message("shape").get_all("dim") == [0, -1, 1, 1]
    assert model.layer("scalar").blobs[0].shape == () and model.layer("scalar").blobs[0] == 3.5
    assert model.inputs == {"data": (2, 3, 8, 8)}


def test_prototxt_and_caffemodel_of_the_same_layers_agree(tmp_path):
    layers = _all_kinds_layers()
    net = CaffeNet("allkinds", layers)
    from_text = parse_prototxt(net.to_text())
    from_binary = decode_caffemodel(encode_caffemodel("allkinds", layers))
    for text_layer, binary_layer in zip(from_text.layers, from_binary.layers):
        assert text_layer.params == binary_layer.params, text_layer.name


def test_caffemodel_blob_encoding_details():
    data = np.arange(6, dtype=np.float64).reshape(2, 3) / 3
    raw = encode_caffemodel("n", [CaffeLayer("ip", "InnerProduct", ["x"], ["y"], blobs=[data])])
    blob = decode_caffemodel(raw).layers[0].blobs[0]
    assert blob.dtype == np.float32 and blob.shape == (2, 3)
    assert np.array_equal(blob, data.astype(np.float32))
    # data is a packed little-endian float run: its bytes appear verbatim
    assert data.astype("<f4").tobytes() in raw


def _field(number: int, wire: int, payload: bytes) -> bytes:
    if wire == 2:
        payload = encode_varint(len(payload)) + payload
    return encode_varint(number << 3 | wire) + payload


def _layer_bytes(*fields: bytes) -> bytes:
    return _field(1, 2, b"net") + _field(100, 2, b"".join(fields))


def test_caffemodel_legacy_blob_forms():
    values = np.arange(6, dtype=np.float32)
    legacy_dims = b"".join(
        _field(n, 0, encode_varint(v)) for n, v in ((1, 1), (2, 1), (3, 2), (4, 3))
    )
    unpacked = b"".join(_field(5, 5, struct.pack("<f", v)) for v in values)
    doubles = _field(8, 2, values.astype("<f8").tobytes())
    raw = _layer_bytes(
        _field(1, 2, b"ip"),
        _field(2, 2, b"InnerProduct"),
        _field(7, 2, legacy_dims + unpacked),  # legacy num/channels/height/width, unpacked floats
        _field(7, 2, doubles),  # double_data, no shape
    )
    layer = decode_caffemodel(raw).layers[0]
    assert layer.blobs[0].shape == (1, 1, 2, 3) and np.array_equal(layer.blobs[0].ravel(), values)
    assert layer.blobs[1].shape == (6,) and layer.blobs[1].dtype == np.float32
    assert np.array_equal(layer.blobs[1], values)


def test_caffemodel_skips_unknown_fields_of_every_wire_type():
    known = [
        _field(1, 2, b"conv"),
        _field(2, 2, b"Convolution"),
        _field(106, 2, _field(1, 0, encode_varint(8))),
    ]
    unknown = [
        _field(900, 0, encode_varint(2**63)),
        _field(901, 1, b"\x01" * 8),
        _field(902, 2, b"anything"),
        encode_varint(903 << 3 | 3)
        + _field(1, 0, b"\x05")
        + encode_varint(903 << 3 | 4),  # a group
        _field(904, 5, b"\x02" * 4),
        _field(106, 2, _field(99, 2, b"unknown inside a known message")),
    ]
    plain = decode_caffemodel(_layer_bytes(*known)).layers
    noisy = decode_caffemodel(
        _layer_bytes(known[0], unknown[0], known[1], *unknown[1:5], known[2], unknown[5])
    )
    assert noisy.layers == plain
    assert plain[0].type_params.get("num_output") == 8


def test_caffemodel_legacy_v1_layers_are_upgraded():
    v1 = b"".join(
        [
            _field(4, 2, b"conv1"),
            _field(5, 0, encode_varint(4)),  # type CONVOLUTION
            _field(2, 2, b"data"),
            _field(3, 2, b"conv1"),
            _field(7, 5, struct.pack("<f", 1.0)),
            _field(7, 5, struct.pack("<f", 2.0)),  # blobs_lr
            _field(
                10, 2, _field(1, 0, encode_varint(20)) + _field(4, 0, encode_varint(5))
            ),  # convolution_param
            _field(6, 2, _field(5, 2, np.ones(3, "<f4").tobytes())),
        ]
    )
    model = decode_caffemodel(_field(1, 2, b"old") + _field(2, 2, v1))
    layer = model.layers[0]
    assert (layer.name, layer.type, layer.bottoms, layer.tops) == (
        "conv1",
        "Convolution",
        ["data"],
        ["conv1"],
    )
    assert [p.get("lr_mult") for p in layer.params.get_all("param")] == [1.0, 2.0]
    assert layer.type_params.get("num_output") == 20 and layer.type_params.get_all(
        "kernel_size"
    ) == [5]
    assert np.array_equal(layer.blobs[0], np.ones(3, np.float32))


# ---------------------------------------------------------------------------------
# truncated and garbled caffemodels


def test_truncated_caffemodel_raises_file_format_error(lenet_dir, tmp_path):
    raw = (lenet_dir / "lenet_iter_10000.caffemodel").read_bytes()
    for cut in [0, 1, 2, 5, 8, 50, 1000, 10_000, len(raw) // 2, len(raw) - 100, len(raw) - 1]:
        path = tmp_path / f"cut{cut}.caffemodel"
        path.write_bytes(raw[:cut])
        with pytest.raises(FileFormatError) as info:
            read_caffemodel(path)
        assert info.value.path == str(path)
        assert str(info.value).startswith(f"{path}: ")
        if cut:
            assert "byte offset" in info.value.problem


def test_cut_or_garbled_caffemodel_never_raises_another_exception(lenet_dir):
    raw = (lenet_dir / "lenet_iter_10000.caffemodel").read_bytes()
    whole_layers = len(decode_caffemodel(raw).layers)
    for cut in range(0, len(raw), 4999):
        try:
            model = decode_caffemodel(raw[:cut])
        except FileFormatError:
            continue
        assert len(model.layers) < whole_layers  # a cut between two layers is valid protobuf
    rng = random.Random(1234)
    for trial in range(200):
        data = bytearray(raw[:2400] if trial % 2 else raw)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            decode_caffemodel(bytes(data))
        except FileFormatError:
            pass


def test_text_prototxt_given_as_caffemodel_is_named(lenet_dir):
    with pytest.raises(FileFormatError, match="looks like a text prototxt"):
        read_caffemodel(lenet_dir / "lenet.prototxt")


# ---------------------------------------------------------------------------------
# encoding errors


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"convolution_param": {"num_outputs": 3}}, "has no field 'num_outputs'"),
        ({"pooling_param": {"pool": "MAX"}}, "EnumValue"),
        ({"pooling_param": {"pool": EnumValue("MAXIMUM")}}, "not a PoolMethod value"),
        ({"convolution_param": {"num_output": -1}}, "out of range for uint32"),
        ({"convolution_param": {"num_output": 1.5}}, "expected an integer"),
        ({"convolution_param": {"num_output": [1, 2]}}, "not a repeated field"),
        ({"relu_param": {"negative_slope": "0.1"}}, "expected a number"),
        ({"param": [{"name": EnumValue("w")}]}, "expected a quoted string"),
        ({"bogus_param": {}}, "LayerParameter has no field 'bogus_param'"),
    ],
)
def test_encoding_bad_params_names_the_field(params, fragment):
    with pytest.raises(ValueError, match=fragment):
        encode_caffemodel("n", [CaffeLayer("l", "Convolution", ["a"], ["b"], params)])


def test_encode_decode_message_directly():
    msg = Message(pool=EnumValue("AVE"), kernel_size=3, stride=2, global_pooling=False)
    raw = encode_message(msg, "PoolingParameter")
    assert raw == bytes([0x08, 1, 0x10, 3, 0x18, 2, 0x60, 0])  # field-number order
    assert decode_message(raw, "PoolingParameter") == msg
    assert decode_message(
        encode_message({"dim": [1, 3, 224, 224]}, "BlobShape"), "BlobShape"
    ).get_all("dim") == [
        1,
        3,
        224,
        224,
    ]
    with pytest.raises(KeyError):
        encode_message(msg, "NoSuchParameter")


# ---------------------------------------------------------------------------------
# varints


@given(st.integers(min_value=-(2**63), max_value=2**64 - 1))
@settings(max_examples=300, deadline=None)
def test_varint_round_trip(value):
    raw = encode_varint(value)
    assert 1 <= len(raw) <= 10
    assert decode_varint(raw) == (value % 2**64, len(raw))
    assert all(b & 0x80 for b in raw[:-1]) and not raw[-1] & 0x80
    with pytest.raises(FileFormatError, match="truncated varint"):
        decode_varint(raw[:-1])


@given(st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=20))
@settings(max_examples=100, deadline=None)
def test_varint_sequences_decode_in_order(values):
    raw = b"".join(encode_varint(v) for v in values)
    pos, out = 0, []
    while pos < len(raw):
        value, pos = decode_varint(raw, pos)
        out.append(value)
    assert out == values


def test_varint_limits():
    assert encode_varint(0) == b"\x00" and encode_varint(300) == b"\xac\x02"
    assert encode_varint(-1) == b"\xff" * 9 + b"\x01"
    with pytest.raises(ValueError):
        encode_varint(2**64)
    with pytest.raises(FileFormatError, match="longer than 10 bytes"):
        decode_varint(b"\xff" * 11)


# ---------------------------------------------------------------------------------
# prototxt text


def test_message_building_and_access():
    msg = Message(
        {"shape": {"dim": [1, 3]}},
        num_output=np.int64(8),
        eps=np.float32(1e-3),
        flag=np.bool_(True),
    )
    assert msg.names() == ["shape", "num_output", "eps", "flag"]
    assert msg.get("num_output") == 8 and type(msg.get("num_output")) is int
    assert msg.get("eps") == 0.001 and msg.get("flag") is True
    assert msg.get_message("shape").get_all("dim") == [1, 3]
    assert msg.get_message("absent") == Message() and msg.get("absent", 7) == 7
    msg.add("dim", 4).add("dim", 5)
    msg.set("dim", [6])
    assert msg.get_all("dim") == [6]
    assert msg.remove("dim") == 1 and "dim" not in msg
    assert Message(a=1, b=2) == Message(b=2, a=1)  # different fields: order does not matter
    assert Message([("a", 1), ("a", 2)]) != Message([("a", 2), ("a", 1)])  # repeated: it does
    assert Message(pool=EnumValue("MAX")) != Message(pool="MAX")  # identifier vs quoted string
    assert msg.to_dict()["shape"] == {"dim": [1, 3]}
    with pytest.raises(ValueError):
        EnumValue("not an identifier")
    with pytest.raises(TypeError):
        Message().add("x", object())


def test_text_round_trip_of_tricky_values():
    msg = Message(
        [
            ("name", 'quote " backslash \\ tab \t newline \n ünïcödé \x01'),
            ("neg", -7),
            ("big", 2**63 - 1),
            ("f", 1e-5),
            ("g", -2.5e30),
            ("whole", 3.0),
            ("inf", math.inf),
            ("ninf", -math.inf),
            ("nan", math.nan),
            ("yes", True),
            ("no", False),
            ("mode", EnumValue("ACROSS_CHANNELS")),
            ("empty", {}),
            ("nested", {"inner": {"dim": [1, 2, 3]}, "s": ""}),
        ]
    )
    text = format_prototxt(msg)
    again = parse_text_message(text)
    assert again == msg
    assert type(again.get("whole")) is float and type(again.get("neg")) is int
    assert isinstance(again.get("mode"), EnumValue) and not isinstance(again.get("name"), EnumValue)


def test_text_syntax_variants():
    text = (
        b"""# comment line
\xef\xbb\xbf""".replace(b"\xef\xbb\xbf", b"")
        + b"""
name: 'single' "concat"   # trailing comment
layer <
  type: "X"; top: "a", top: "b"
  shape: { dim: [1, 0x10, 010] }
  value: -inf v2: .5 v3: 1.5f v4: 1e3 v5: nan
  esc: "\\x41\\101\\u00e9\\n"
>
"""
    )
    msg = parse_text_message(text)
    assert msg.get("name") == "singleconcat"
    layer = msg.get("layer")
    assert layer.get_all("top") == ["a", "b"]
    assert layer.get_message("shape").get_all("dim") == [1, 16, 8]
    assert layer.get("value") == -math.inf and layer.get("v2") == 0.5 and layer.get("v3") == 1.5
    assert layer.get("v4") == 1000.0 and math.isnan(layer.get("v5"))
    assert layer.get("esc") == "AAé\n"
    assert layer.line == 4 and layer.line_of("esc") == 8


def test_legacy_prototxt_inputs_and_v1_layers():
    text = """
name: "old"
input: "data"
input_dim: 1
input_dim: 3
input_dim: 32
input_dim: 32
layers {
  name: "conv1"
  type: CONVOLUTION
  bottom: "data"
  top: "conv1"
  blobs_lr: 1
  blobs_lr: 2
  weight_decay: 1
  weight_decay: 0
  convolution_param { num_output: 8 kernel_size: 3 }
}
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
"""
    net = parse_prototxt(text)
    assert net.inputs == {"data": (1, 3, 32, 32)}
    assert [(l.name, l.type) for l in net.layers] == [("conv1", "Convolution"), ("relu1", "ReLU")]
    specs = net.layers[0].params.get_all("param")
    assert [(p.get("lr_mult"), p.get("decay_mult")) for p in specs] == [(1, 1), (2, 0)]
    assert net.layers[1].line == 19
    # written back as new-style layers with input_shape, same Caffe view
    text2 = net.to_text()
    assert "layers" not in text2 and "input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }" in text2
    assert parse_prototxt(text2) == net


def test_input_layer_with_several_tops_and_input_shape():
    net = parse_prototxt(
        'input: "x"\ninput_shape { dim: 2 dim: 5 }\n'
        'layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 1 dim: 4 } } }\n'
    )
    assert net.inputs == {"x": (2, 5), "a": (1, 4), "b": (1, 4)}
    assert net.blobs_in_order() == ["x", "a", "b"]


def test_built_net_writes_deploy_text():
    layers = [
        CaffeLayer(
            "data", "Input", [], ["data"], {"input_param": {"shape": {"dim": [1, 1, 28, 28]}}}
        ),
        CaffeLayer(
            "pool1",
            "Pooling",
            ["data"],
            ["pool1"],
            {"pooling_param": Message(pool=EnumValue("MAX"), kernel_size=2, stride=2)},
        ),
    ]
    text = CaffeNet("tiny", layers).to_text()
    assert "pool: MAX" in text and 'type: "Pooling"' in text
    net = parse_prototxt(text)
    assert net.layers == layers and net.inputs == {"data": (1, 1, 28, 28)}
    with pytest.raises(ValueError, match="belongs in the layer"):
        CaffeLayer("x", "ReLU", [], [], {"top": "y"})
    with pytest.raises(TypeError):
        CaffeLayer("x", "ReLU", "a", ["b"])


BAD_PROTOTXTS = [
    # text, expected line, fragment of the problem
    ('name: "net"\nlayer {\n  name: "conv1\n  type: "Convolution"\n}\n', 3, "unterminated string"),
    ('layer {\n  name: "a"\n}\n}\n', 4, "unexpected '}'"),
    (
        "layer {\n  convolution_param {\n    num_output:\n    kernel_size: 3\n  }\n}\n",
        3,
        "missing value for field 'num_output'",
    ),
    ('layer {\n  name: "a"\n  top:\n}\n', 3, "missing value for field 'top'"),
    ('layer {\n  name: "a"\n  top: "b"\n', 1, "unbalanced braces"),
    ('layer {\n  name: "a"\n  convolution_param {\n    num_output: 3\n}\n', 1, "unbalanced braces"),
    ('name: "x"\nlayer {\n  num_output 20\n}\n', 3, "expected ':' or '{'"),
    ('name: "x"\n\n  @\n', 3, "unexpected character '@'"),
    ("layer {\n  kernel_size: 1.2.3\n}\n", 2, "invalid number '1.2.3'"),
    ('layer {\n  name: "a\\q"\n}\n', 2, "invalid escape"),
    ('layer {\n  name: "a"\n  type: Convolution\n}\n', 3, "type must be a quoted string"),
    (
        'layer { name: "a" type: "X" }\nlayers { name: "b" type: RELU }\n',
        2,
        "mixes new-style 'layer' and legacy 'layers'",
    ),
    ('layers {\n  name: "b"\n  type: NOT_A_TYPE\n}\n', 3, "unknown legacy layer type"),
    (
        'layer {\n name: "in" type: "Input" top: "a" top: "b" top: "c"\n'
        " input_param { shape { dim: 1 } shape { dim: 2 } }\n}\n",
        1,
        "3 tops but 2 shapes",
    ),
    ('input: "a"\ninput: "b"\ninput_dim: 1\ninput_dim: 2\n', 3, "4 integers per input"),
    ('layer {\n  "name": "a"\n}\n', 2, "expected a field name"),
    ('layer {\n  name: "a"\n  type: "Input"\n  input_param: 3\n}\n', 4, "must be a block"),
]


@pytest.mark.parametrize("text, line, fragment", BAD_PROTOTXTS)
def test_prototxt_syntax_errors_name_file_and_line(tmp_path, text, line, fragment):
    path = tmp_path / "bad.prototxt"
    path.write_text(text)
    with pytest.raises(FileFormatError) as info:
        parse_prototxt(path)
    err = info.value
    assert (err.path, err.line) == (str(path), line), str(err)
    assert fragment in err.problem
    assert str(err).startswith(f"{path}:{line}: ")


def test_prototxt_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.prototxt"
    path.write_bytes(b'name: "net"\nlayer {\n  name: "a"\n  type: "caf\xe9"\n}\n')
    with pytest.raises(FileFormatError, match="not UTF-8") as info:
        parse_prototxt(path)
    assert info.value.line == 4


def test_mutated_prototxt_raises_only_file_format_error(lenet_dir):
    raw = (lenet_dir / "lenet.prototxt").read_bytes()
    rng = random.Random(7)
    alphabet = b"{}[]<>:;,\"'#-.0123456789abxyzMAX_ \n\t\xff\xe9"
    parsed = 0
    for _ in range(600):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            roll = rng.random()
            if roll < 0.4:
                data[at] = rng.choice(alphabet)
            elif roll < 0.7:
                del data[at : at + rng.randint(1, 5)]
            else:
                data[at:at] = bytes([rng.choice(alphabet)])
        try:
            parse_prototxt(bytes(data))
            parsed += 1
        except FileFormatError:
            pass
    assert 0 < parsed < 600


def test_caffemodel_singular_scalar_last_value_wins():
    raw = _layer_bytes(
        _field(1, 2, b"first"),
        _field(2, 2, b"ReLU"),
        _field(123, 2, _field(1, 5, struct.pack("<f", 0.5))),
        _field(1, 2, b"second"),
        _field(123, 2, _field(1, 5, struct.pack("<f", 0.25))),
    )
    layer = decode_caffemodel(raw).layers[0]
    assert layer.name == "second"
    assert layer.params == Message(relu_param={"negative_slope": 0.25})
