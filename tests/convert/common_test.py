"""Tests for mia_jax.convert.common: transforms and the strict key-table applier."""

from absl.testing import absltest
import jax
import numpy as np

from mia_jax.convert import common


def _sds(shape, dtype=np.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def _abstract():
  return {"conv": {"kernel": _sds((3, 3, 2, 4)), "bias": _sds((4,))},
          "dense": {"kernel": _sds((5, 6)), "bias": _sds((6,))},
          "norm": {"scale": _sds((4,)), "bias": _sds((4,))}}


def _source(rng):
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return {"c.weight": f(4, 2, 3, 3), "c.bias": f(4), "l.weight": f(6, 5),
          "l.bias": f(6), "n.weight": f(4), "n.bias": f(4)}


def _table():
  return [common.rule("conv/kernel", "c.weight", common.conv_oihw_to_hwio),
          common.rule("conv/bias", "c.bias"),
          common.rule("dense/kernel", "l.weight", common.linear_to_dense),
          common.rule("dense/bias", "l.bias"),
          common.rule("norm/scale", "n.weight"),
          common.rule("norm/bias", "n.bias")]


class TransformTest(absltest.TestCase):

  def test_conv_oihw_to_hwio_moves_every_element(self):
    w = np.arange(4 * 2 * 3 * 5, dtype=np.float32).reshape(4, 2, 3, 5)
    k = common.conv_oihw_to_hwio(w)
    self.assertEqual(k.shape, (3, 5, 2, 4))
    for o, i, h, x in [(0, 0, 0, 0), (3, 1, 2, 4), (2, 0, 1, 3)]:
      self.assertEqual(k[h, x, i, o], w[o, i, h, x])

  def test_linear_to_dense_computes_the_same_map(self):
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((6, 5)), rng.standard_normal((3, 5))
    np.testing.assert_allclose(x @ common.linear_to_dense(w), x @ w.T)

  def test_conv1x1_and_linear_layouts_agree(self):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 5, 1, 1))
    dense = common.conv1x1_to_dense(w)
    np.testing.assert_array_equal(dense, w[:, :, 0, 0].T)
    np.testing.assert_array_equal(
        common.linear_to_conv1x1(w[:, :, 0, 0])[0, 0], dense)
    with self.assertRaisesRegex(ValueError, "1x1"):
      common.conv1x1_to_dense(np.zeros((6, 5, 3, 3)))

  def test_split_then_transform(self):
    w = np.arange(12.0).reshape(6, 2)
    q, k, v = common.split(3, then=common.linear_to_dense)(w)
    np.testing.assert_array_equal(k, w[2:4].T)
    with self.assertRaisesRegex(ValueError, "equal parts"):
      common.split(4)(w)


class ApplyKeyTableTest(absltest.TestCase):

  def test_success_fills_tree_with_transformed_values(self):
    src = _source(np.random.default_rng(0))
    params = common.apply_key_table(src, _table(), _abstract())
    np.testing.assert_array_equal(params["conv"]["kernel"],
                                  src["c.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["dense"]["kernel"],
                                  src["l.weight"].T)
    np.testing.assert_array_equal(params["norm"]["scale"], src["n.weight"])
    self.assertEqual(
        jax.tree.structure(params), jax.tree.structure(_abstract()))

  def test_missing_source_key(self):
    src = _source(np.random.default_rng(0))
    del src["l.bias"]
    with self.assertRaises(common.ConversionError) as cm:
      common.apply_key_table(src, _table(), _abstract())
    e = cm.exception
    self.assertTrue(any("l.bias" in m for m in e.missing), e.missing)
    self.assertTrue(any("dense/bias" in m for m in e.missing), e.missing)
    self.assertEqual(e.unexpected, [])

  def test_unexpected_source_key(self):
    src = _source(np.random.default_rng(0))
    src["extra.weight"] = np.zeros(3, np.float32)
    with self.assertRaises(common.ConversionError) as cm:
      common.apply_key_table(src, _table(), _abstract())
    self.assertEqual(cm.exception.unexpected, ["extra.weight"])
    self.assertIn("extra.weight", str(cm.exception))

  def test_wrong_shape(self):
    src = _source(np.random.default_rng(0))
    src["c.bias"] = np.zeros(5, np.float32)
    with self.assertRaises(common.ConversionError) as cm:
      common.apply_key_table(src, _table(), _abstract())
    (line,) = cm.exception.mismatched
    self.assertIn("conv/bias", line)
    self.assertIn("(5,)", line)
    self.assertIn("(4,)", line)

  def test_leaf_not_filled(self):
    with self.assertRaises(common.ConversionError) as cm:
      common.apply_key_table(
          {k: v for k, v in _source(np.random.default_rng(0)).items()
           if k != "n.bias"}, _table()[:-1], _abstract())
    self.assertEqual(cm.exception.missing, ["norm/bias"])

  def test_all_problems_reported_together(self):
    src = _source(np.random.default_rng(0))
    del src["l.bias"]
    src["c.bias"] = np.zeros(5, np.float32)
    src["junk"] = np.zeros(1, np.float32)
    with self.assertRaises(common.ConversionError) as cm:
      common.apply_key_table(src, _table(), _abstract())
    e = cm.exception
    self.assertLen(e.mismatched, 1)
    self.assertEqual(e.unexpected, ["junk"])
    self.assertNotEmpty(e.missing)

  def test_dtype_cast_and_strict_dtype(self):
    src = {k: v.astype(np.float16) for k, v in
           _source(np.random.default_rng(0)).items()}
    params = common.apply_key_table(src, _table(), _abstract())
    self.assertEqual(params["conv"]["kernel"].dtype, np.float32)
    with self.assertRaises(common.ConversionError) as cm:
      common.apply_key_table(src, _table(), _abstract(), cast_floats=False)
    self.assertLen(cm.exception.mismatched, 6)
    self.assertIn("float16", cm.exception.mismatched[0])

  def test_float64_beyond_float32_range_is_refused(self):
    # The cast made them inf after check_finite had passed the float64s.
    src = {k: v.astype(np.float64) for k, v in
           _source(np.random.default_rng(0)).items()}
    src["c.bias"] = np.full(src["c.bias"].shape, 1e39)
    with self.assertRaises(common.ConversionError) as cm:
      common.apply_key_table(src, _table(), _abstract())
    self.assertLen(cm.exception.mismatched, 1)
    self.assertIn("overflow", cm.exception.mismatched[0])

  def test_integer_source_is_not_cast(self):
    src = _source(np.random.default_rng(0))
    src["c.bias"] = np.zeros(4, np.int64)
    with self.assertRaises(common.ConversionError) as cm:
      common.apply_key_table(src, _table(), _abstract())
    self.assertIn("int64", cm.exception.mismatched[0])

  def test_source_used_twice_and_unknown_target(self):
    table = _table() + [common.rule("norm/extra", "n.bias")]
    with self.assertRaises(common.ConversionError) as cm:
      common.apply_key_table(_source(np.random.default_rng(0)), table,
                             _abstract())
    self.assertTrue(any("n.bias" in d for d in cm.exception.duplicated))
    self.assertTrue(any("target:norm/extra" in u
                        for u in cm.exception.unexpected))

  def test_drop_consumes_and_checks(self):
    src = _source(np.random.default_rng(0))
    src["buf"] = np.ones(3, np.float32)

    def check(x):
      if not np.all(x == 1):
        raise ValueError("buffer is not all ones")

    table = _table() + [common.drop("buf", check)]
    common.apply_key_table(src, table, _abstract())  # consumed: no error
    src["buf"] = np.zeros(3, np.float32)
    with self.assertRaisesRegex(common.ConversionError, "not all ones"):
      common.apply_key_table(src, table, _abstract())

  def test_many_to_many_rule(self):
    abstract = {"q": {"kernel": _sds((2, 2))}, "k": {"kernel": _sds((2, 2))}}
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    table = [common.Rule(("qk.weight",), ("q/kernel", "k/kernel"),
                         common.split(2, then=common.linear_to_dense))]
    params = common.apply_key_table({"qk.weight": w}, table, abstract)
    np.testing.assert_array_equal(params["k"]["kernel"], w[2:].T)

  def test_strip_prefix_and_collision(self):
    out = common.strip_prefix({"module.a": 1, "b": 2}, "module.")
    self.assertEqual(out, {"a": 1, "b": 2})
    with self.assertRaisesRegex(common.ConversionError, "collide"):
      common.strip_prefix({"module.a": 1, "a": 2}, "module.")

  def test_check_tree_matches(self):
    params = common.apply_key_table(_source(np.random.default_rng(0)),
                                    _table(), _abstract())
    common.check_tree_matches(params, _abstract())
    params["conv"]["bias"] = np.zeros(3, np.float32)
    with self.assertRaises(common.ConversionError) as cm:
      common.check_tree_matches(params, _abstract())
    self.assertIn("conv/bias", cm.exception.mismatched[0])


if __name__ == "__main__":
  absltest.main()
