"""The prediction command checks every input against the catalogue before loading a model
(unimp_jax.eval.predictor.check_request; unimp_jax/predict.py prints its error in one line)."""

import pytest

from unimp_jax.eval import predictor


@pytest.mark.parametrize('values,says', [
    (dict(top_k=-3), '--top_k -3: must be between 1 and 97'),
    (dict(top_k=5000), '--top_k 5000: must be between 1 and 97'),
    (dict(rate=99999), '--rate 99999: not an item id of this catalogue (0 to 99)'),
    (dict(history=['3', 'x']), "--history 'x': not an item id"),
    (dict(history=['100']), '--history 100: not an item id'),
    (dict(select=['1', '2']), '--select: 2 candidates; selection takes exactly 3'),
    (dict(new_items=['missing.png|Linen shirt']), "no picture at 'missing.png'"),
    (dict(new_items=['|Linen shirt|shirt|Acorn|cheap']), "price 'cheap' is not a number"),
    (dict(generate='red dress', image_codes=True), '--generate QUERY and --generate_out FILE.png go together'),
    (dict(generate='red dress', generate_out='a.png'), 'trained without image codes'),
    (dict(generate='red dress', generate_out='a.png', image_codes=True, new_items=['|Linen shirt']),
     'a new item has no image codes'),
])
def test_bad_inputs_are_refused_naming_the_flag(values, says):
  with pytest.raises(predictor.InputError) as e:
    predictor.check_request(100, 3, **{'history': ['3', '17', '29'], **values})
  assert says in str(e.value)


def test_good_inputs_pass_through(tmp_path):
  picture = tmp_path / 'p.png'
  picture.write_bytes(b'')
  out = predictor.check_request(100, 3, history=['3', '17'], top_k=98, rate=5, select=['1', '2', '4'],
                                new_items=[f'{picture}|Linen shirt|shirt|Acorn|19.99'])
  assert out['history'][:2] == [3, 17] and out['history'][2].price == 19.99
  assert out['rate'] == 5 and out['select'] == [1, 2, 4]
