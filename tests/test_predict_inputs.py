"""The prediction command checks every input against the catalogue before loading a model."""

import pytest
from absl import flags
from absl.testing import flagsaver

from unimp_jax import predict


@pytest.mark.parametrize('values,says', [
    (dict(top_k=-3), '--top_k -3: must be between 1 and 97'),
    (dict(top_k=5000), '--top_k 5000: must be between 1 and 97'),
    (dict(rate=99999), '--rate 99999: not an item id of this catalogue (0 to 99)'),
    (dict(history=['3', 'x']), "--history 'x': not an item id"),
    (dict(history=['100']), '--history 100: not an item id'),
    (dict(select=['1', '2']), '--select: 2 candidates; selection takes exactly 3'),
    (dict(new_item=['missing.png|Linen shirt']), "no picture at 'missing.png'"),
    (dict(new_item=['|Linen shirt|shirt|Acorn|cheap']), "price 'cheap' is not a number"),
])
def test_bad_inputs_are_refused_naming_the_flag(values, says):
  with flagsaver.flagsaver(workdir='unused', **{'history': ['3', '17', '29'], **values}):
    with pytest.raises(predict.InputError) as e:
      predict.checked_inputs(num_items=100, num_slots=3)
  assert says in str(e.value)


def test_good_inputs_pass_through(tmp_path):
  picture = tmp_path / 'p.png'
  picture.write_bytes(b'')
  with flagsaver.flagsaver(workdir='unused', history=['3', '17'], top_k=98, rate=5, select=['1', '2', '4'],
                           new_item=[f'{picture}|Linen shirt|shirt|Acorn|19.99']):
    out = predict.checked_inputs(num_items=100, num_slots=3)
  assert out['history'][:2] == [3, 17] and out['history'][2].price == 19.99
  assert out['rate'] == 5 and out['select'] == [1, 2, 4]
