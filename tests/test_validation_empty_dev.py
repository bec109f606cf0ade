"""Validation (megavac/train/validation.py) with a language that has no dev data: left out of the average,
listed as missing, never scored as a loss of 0."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.prepare import PrepareConfig, prepare
from conftest import write_two_pair_corpus
from megavac.config import TrainConfig, model_config
from megavac.data import MultilingualDataset
from megavac.model import Transformer
from megavac.train.validation import Validator

pytestmark = pytest.mark.filterwarnings("ignore::data_pipeline.corpus.CorpusWarning")  # absent test splits


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Pairs xa (dev files present but empty) and xb (10 dev lines), both directions."""
    root = tmp_path_factory.mktemp("empty_dev")
    write_two_pair_corpus(root)
    with pytest.warns(UserWarning, match="pair xa has no dev data, so en-xa, xa-en get no validation loss"):
        prepare(PrepareConfig(corpus=root / "corpus", out=root / "prepared", vocab_size=300, workers=1, quiet=True,
                              direction="both"))
    return root / "prepared"


def _model(ds: MultilingualDataset) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(model_config(TrainConfig(model="tiny"), ds.meta["vocab_size"], ds.pad_id))
    return model.train()


def _validator(ds, rank=0, world=1):
    return Validator(ds, max_tokens=2000, max_positions=1024, rank=rank, world=world, device=torch.device("cpu"),
                     smoothing=0.1)


def test_language_without_dev_data_is_missing_not_zero(prepared, capsys):
    ds = MultilingualDataset(str(prepared), "dev")
    assert ds.names == ["en-xa", "xa-en", "en-xb", "xb-en"] and ds.sizes.tolist() == [0, 0, 10, 10]
    out = _validator(ds).run(_model(ds))
    for key in ("loss", "nll", "ppl"):
        assert list(out[key]) == ["en-xb", "xb-en"], key  # what the trainer prints: languages with a loss
    assert out["missing"] == ["en-xa", "xa-en"]
    assert "validation: no dev data for en-xa, xa-en; left out of the average" in capsys.readouterr().out
    assert all(x > 1.0 for x in out["nll"].values())  # an untrained model, not a 0 for missing data
    assert out["avg_nll"] == pytest.approx(sum(out["nll"].values()) / 2)
    assert out["avg_loss"] == pytest.approx(sum(out["loss"].values()) / 2)
    # The same numbers as validating the languages with dev data alone.
    alone = MultilingualDataset(str(prepared), "dev", "en-xb,xb-en")
    ref = _validator(alone).run(_model(alone))
    assert ref["missing"] == [] and ref["avg_nll"] == pytest.approx(out["avg_nll"])
    assert ref["nll"] == pytest.approx(out["nll"])


def test_rank_short_of_batches_does_not_read_an_empty_language(prepared):
    """A rank with fewer batches runs a zero-weight filler forward; it used to take line 0 of language 0,
    which does not exist when language 0 has no dev data."""
    ds = MultilingualDataset(str(prepared), "dev")
    model = _model(ds)
    world = 3
    validators = [_validator(ds, rank=r, world=world) for r in range(world)]
    assert any(not items for v in validators for items in v.batches)  # some rank runs a filler
    totals = [v._plain(model).sums for v in validators]
    assert sum(t[2].sum().item() for t in totals) == ds.tgt_len[2].sum() + ds.tgt_len[3].sum()  # every token once


def test_no_dev_data_at_all_is_refused_at_start(prepared):
    """An average over no language would be NaN, which the trainer would take for a diverged run."""
    ds = MultilingualDataset(str(prepared), "dev", "en-xa,xa-en")
    with pytest.raises(ValueError, match=r"no dev data for any language \(en-xa, xa-en\): validation, which selects "
                                         r"the best checkpoint, needs at least one"):
        _validator(ds)
