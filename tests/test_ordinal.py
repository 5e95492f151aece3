"""4-level ECG triage: PDI and ordinal concordance against hand computations, the ordinal head (losses, ordered
cutpoints, metrics), triage labels from SNOMED-CT codes, and the triage recipes on real Challenge 2021 records."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from ecgfm.data.triage import TRIAGE_LEVELS, load_triage_mapping, parse_level, triage_level, triage_one_hot
from ecgfm.heads import OrdinalHead, create_head
from ecgfm.metrics import ordinal_concordance, polytomous_discrimination_index

REPO = Path(__file__).resolve().parents[1]
TRIAGE_RECIPES = REPO / "recipes" / "triage"
LEVELS = list(TRIAGE_LEVELS)


def built(head: OrdinalHead, labels=None, in_features: int = 8) -> OrdinalHead:
    head.build(in_features, labels or LEVELS)
    return head


def one_hot(levels, k: int = 4) -> torch.Tensor:
    return F.one_hot(torch.as_tensor(levels), k).float()


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6)


# ------------------------------------------------------------------------------------------------ metric functions


def test_pdi_small_case_by_hand_with_ties():
    # 3 categories: cases a1, a2 (category 0), b1 (category 1), c1, c2 (category 2) -> 2 x 1 x 2 = 4 triples.
    probs = np.array(
        [
            [0.6, 0.3, 0.1],  # a1
            [0.3, 0.3, 0.4],  # a2
            [0.3, 0.5, 0.2],  # b1
            [0.2, 0.3, 0.5],  # c1
            [0.3, 0.3, 0.4],  # c2
        ]
    )
    labels = np.array([0, 0, 1, 2, 2])
    # PDI_0, P(category 0) of (a, b1, c):
    #   (a1, b1, c1) = (.6, .3, .2) -> a1 wins: 1      (a1, b1, c2) = (.6, .3, .3) -> 1
    #   (a2, b1, c1) = (.3, .3, .2) -> a2 ties b1: 1/2  (a2, b1, c2) = (.3, .3, .3) -> three-way tie: 1/3
    #   PDI_0 = (1 + 1 + 1/2 + 1/3) / 4 = 17/24
    # PDI_1, P(category 1): b1 has .5, every a and c has .3 or less -> 4/4 = 1
    # PDI_2, P(category 2) of (a, b1, c):
    #   (a1, b1, c1) = (.1, .2, .5) -> 1   (a2, b1, c1) = (.4, .2, .5) -> 1
    #   (a1, b1, c2) = (.1, .2, .4) -> 1   (a2, b1, c2) = (.4, .2, .4) -> c2 ties a2: 1/2
    #   PDI_2 = 3.5 / 4 = 21/24
    # PDI = (17/24 + 24/24 + 21/24) / 3 = 62/72
    pdi, terms = polytomous_discrimination_index(probs, labels)
    np.testing.assert_allclose(terms, [17 / 24, 1.0, 21 / 24])
    assert pdi == pytest.approx(62 / 72)


def test_pdi_perfect_and_constant_with_four_levels():
    labels = np.array([0, 0, 1, 2, 2, 3, 3, 3])
    perfect = np.eye(4)[labels] * 0.7 + 0.075
    assert polytomous_discrimination_index(perfect, labels)[0] == pytest.approx(1.0)
    constant = np.full((len(labels), 4), 0.25)
    pdi, terms = polytomous_discrimination_index(constant, labels)
    assert pdi == pytest.approx(0.25) and np.allclose(terms, 0.25)


def test_ordinal_concordance_small_case_by_hand_with_ties():
    labels = np.array([0, 0, 1, 2, 2])
    scores = np.array([0.1, 0.5, 0.5, 0.4, 0.9])
    # pairs (lower category score, higher category score) -> credit:
    #   0-1: (.1, .5) 1, (.5, .5) tie 1/2                     -> AUC(0, 1) = 1.5 / 2 = 3/4
    #   0-2: (.1, .4) 1, (.1, .9) 1, (.5, .4) 0, (.5, .9) 1   -> AUC(0, 2) = 3 / 4
    #   1-2: (.5, .4) 0, (.5, .9) 1                           -> AUC(1, 2) = 1 / 2
    # pairs: 5.5 / 8; categories (ORC): (3/4 + 3/4 + 1/2) / 3 = 2/3
    assert ordinal_concordance(scores, labels, average="pairs") == pytest.approx(5.5 / 8)
    assert ordinal_concordance(scores, labels, average="categories") == pytest.approx(2 / 3)


def test_ordinal_concordance_perfect_and_constant():
    labels = np.array([0, 1, 1, 2, 3, 3])
    assert ordinal_concordance(labels * 2.0 + 1, labels) == pytest.approx(1.0)
    assert ordinal_concordance(np.zeros(6), labels) == pytest.approx(0.5)
    assert ordinal_concordance(np.zeros(6), labels, average="categories") == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ the head


def test_registry_and_config_round_trip():
    head = create_head(
        {"kind": "ordinal", "name": "triage", "link": "coral", "class_weights": [1, 1, 2, 4], "dropout": 0.1}
    )
    assert isinstance(head, OrdinalHead)
    built(head)
    config = head.config()
    assert config["kind"] == "ordinal"  # stored by registry name: moving the head's file breaks nothing
    again = create_head(config)
    assert again.config() == head.config()
    assert again.config() == {
        "kind": "ordinal",
        "name": "triage",
        "target": "triage",
        "labels": LEVELS,
        "loss_weight": 1.0,
        "link": "coral",
        "class_weights": [1, 1, 2, 4],
        "dropout": 0.1,
    }
    with pytest.raises(ValueError, match="link must be one of cumulative_logit, coral"):
        OrdinalHead(link="probit")
    with pytest.raises(ValueError, match="class_weights has 3 values for 4 levels"):
        built(OrdinalHead(class_weights=[1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="at least 2 levels"):
        built(OrdinalHead(), ["only"])


def test_outputs_probabilities_and_ordered_cutpoints():
    torch.manual_seed(0)
    head = built(OrdinalHead())
    features = torch.randn(16, 8) * 5
    output = head(features)
    assert output.shape == (16, 3)  # K - 1 logits of P(y > k)
    assert (output[:, :-1] > output[:, 1:]).all()  # P(y > k) falls with k
    probs = head.category_probs(output)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(16))
    torch.testing.assert_close(head.log_category_probs(output).exp(), probs, atol=1e-6, rtol=1e-5)
    # whatever the raw parameters, the cutpoints stay ordered
    with torch.no_grad():
        head.cutpoint_gaps.copy_(torch.tensor([-5.0, 3.0]))
        head.first_cutpoint.fill_(2.0)
    cut = head.cutpoints()
    assert (cut[1:] > cut[:-1]).all()
    extreme = torch.tensor([[40.0, 39.0, -60.0], [-80.0, -81.0, -82.0]])
    torch.testing.assert_close(head.category_probs(extreme).sum(1), torch.ones(2))
    assert torch.isfinite(head.log_category_probs(extreme)).all()


def test_postprocess_names_levels_and_median():
    head = built(OrdinalHead())
    output = torch.tensor([[-2.0, -3.0, -4.0], [1.0, 0.5, -1.0], [3.0, 2.0, 1.0]])
    out = head.postprocess(output)
    assert list(out) == [f"p_{level}" for level in LEVELS] + ["expected_level", "level"]
    assert out["level"].tolist() == [0, 2, 3] and out["level"].dtype == torch.long
    probs = head.category_probs(output)
    torch.testing.assert_close(out["expected_level"], probs @ torch.arange(4.0))
    torch.testing.assert_close(out["p_subacute"], probs[:, 2])


@pytest.mark.parametrize("link", ["cumulative_logit", "coral"])
def test_loss_matches_formula_and_ignores_masked_rows(link):
    torch.manual_seed(1)
    head = built(OrdinalHead(link=link))
    output = (torch.randn(5, 3) * 2).sort(1, descending=True).values  # ordered, as the head gives them
    levels = torch.tensor([0, 3, 1, 2, 2])
    target = one_hot(levels)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[2] = False  # row 2 has no label
    target[2] = float("nan")
    loss = head.loss(output, target, mask)
    kept = [0, 1, 3, 4]
    if link == "coral":
        tasks = (levels[:, None] > torch.arange(3)[None, :]).float()
        expected = F.binary_cross_entropy_with_logits(output[kept], tasks[kept])
    else:
        probs = head.category_probs(output)
        expected = -probs[kept, levels[kept]].clamp(min=1e-12).log().mean()
    torch.testing.assert_close(loss, expected)
    for other in (0, 3):  # whatever the masked row says, the loss is unchanged
        changed = target.clone()
        changed[2] = one_hot([other])[0]
        torch.testing.assert_close(head.loss(output, changed, mask), expected)
    assert head.loss(output, target, torch.zeros_like(mask)) == 0.0  # nothing labelled


def test_class_weights_weigh_rows_by_true_level():
    head = built(OrdinalHead(class_weights=[1.0, 1.0, 2.0, 4.0]))
    plain = built(OrdinalHead())
    output = torch.tensor([[0.3, -0.2, -1.0], [1.0, 0.2, -0.5], [2.0, 1.0, 0.5]])
    levels = torch.tensor([0, 2, 3])
    mask = torch.ones(3, 4, dtype=torch.bool)
    per_row = torch.stack([plain.loss(output[i : i + 1], one_hot(levels[i : i + 1]), mask[:1]) for i in range(3)])
    weights = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(head.loss(output, one_hot(levels), mask), (weights * per_row).sum() / weights.sum())


@pytest.mark.parametrize("link", ["cumulative_logit", "coral"])
def test_training_on_separable_features_lowers_the_loss_and_keeps_cutpoints_ordered(link):
    torch.manual_seed(2)
    levels = torch.arange(4).repeat(16)
    features = torch.randn(64, 8) * 0.3
    features[:, 0] += levels.float() * 2  # the level is readable from feature 0
    head = built(OrdinalHead(link=link))
    target, mask = one_hot(levels), torch.ones(64, 4, dtype=torch.bool)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.1)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = head.loss(head(features), target, mask)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        cut = head.cutpoints()
        assert (cut[1:] > cut[:-1]).all()
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        accuracy = (head.predicted_level(head(features)) == levels).float().mean()
    assert accuracy > 0.9


def test_metrics_match_direct_computation_and_batching():
    torch.manual_seed(3)
    head = built(OrdinalHead())
    levels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 0, 2])
    output = (levels.float()[:, None] - torch.tensor([0.5, 1.5, 2.5])[None, :]) + torch.randn(12, 3) * 1.2
    output = output.sort(1, descending=True).values  # ordered, as the head's outputs always are
    target, mask = one_hot(levels), torch.ones(12, 4, dtype=torch.bool)

    whole = head.metrics()
    head.update_metrics(whole, output, target, mask)
    split = head.metrics()
    head.update_metrics(split, output[:5], target[:5], mask[:5])
    # a masked row (any value under the mask) between the batches changes nothing
    head.update_metrics(split, torch.zeros(1, 3), torch.full((1, 4), float("nan")), torch.zeros(1, 4, dtype=bool))
    head.update_metrics(split, output[5:], target[5:], mask[5:])
    a, b = head.compute_metrics(whole), head.compute_metrics(split)
    assert set(a) == set(b) and all(same(float(a[k]), float(b[k])) for k in a)
    assert str(head.tables(whole)) == str(head.tables(split))  # str: NaN entries compare equal

    probs = head.category_probs(output).numpy()
    expected_level = probs @ np.arange(4)
    predicted = (output > 0).sum(1).numpy()
    assert float(a["concordance"]) == pytest.approx(ordinal_concordance(expected_level, levels.numpy()), abs=1e-6)
    assert float(a["ordinal_c_index"]) == pytest.approx(
        ordinal_concordance(expected_level, levels.numpy(), average="categories"), abs=1e-6
    )
    assert float(a["pdi"]) == pytest.approx(polytomous_discrimination_index(probs, levels.numpy())[0], abs=1e-6)
    assert float(a["accuracy"]) == pytest.approx((predicted == levels.numpy()).mean())
    for i, level in enumerate(LEVELS):
        true, called = levels.numpy() == i, predicted == i
        if true.any():
            assert float(a[f"sensitivity/{level}"]) == pytest.approx((true & called).sum() / true.sum())
        assert float(a[f"specificity/{level}"]) == pytest.approx((~true & ~called).sum() / (~true).sum())

    tables = head.tables(whole)
    confusion = tables["confusion"]
    assert list(confusion[0]) == ["true_level", *(f"pred_{level}" for level in LEVELS)]
    counts = np.array([[row[f"pred_{level}"] for level in LEVELS] for row in confusion])
    np.testing.assert_array_equal(counts, np.histogram2d(levels.numpy(), predicted, bins=[np.arange(5)] * 2)[0])
    per_level = tables["per_level"]
    assert [row["level"] for row in per_level] == LEVELS and [row["n"] for row in per_level] == [3, 3, 3, 3]
    assert list(per_level[0]) == ["level", "n", "sensitivity", "specificity", "ppv", "npv", "f1", "pdi"]
    terms = polytomous_discrimination_index(probs, levels.numpy())[1]
    np.testing.assert_allclose([row["pdi"] for row in per_level], terms, rtol=1e-5)


def test_perfect_and_constant_predictions_through_the_head():
    head = built(OrdinalHead())
    levels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    mask = torch.ones(8, 4, dtype=torch.bool)
    perfect = levels.float()[:, None] * 4 - torch.tensor([2.0, 6.0, 10.0])[None, :]
    metrics = head.metrics()
    head.update_metrics(metrics, perfect, one_hot(levels), mask)
    out = head.compute_metrics(metrics)
    for key in ("concordance", "ordinal_c_index", "pdi", "accuracy", "mcc"):
        assert float(out[key]) == pytest.approx(1.0), key
    metrics = head.metrics()
    head.update_metrics(metrics, torch.tensor([[1.0, 0.0, -1.0]]).repeat(8, 1), one_hot(levels), mask)
    out = head.compute_metrics(metrics)
    assert float(out["concordance"]) == pytest.approx(0.5) and float(out["pdi"]) == pytest.approx(0.25)


def test_pdi_is_nan_when_a_level_is_absent_and_empty_epochs_are_nan():
    head = built(OrdinalHead())
    metrics = head.metrics()
    levels = torch.tensor([0, 1, 2, 1])  # no acute case
    head.update_metrics(
        metrics, torch.randn(4, 3).sort(1, descending=True).values, one_hot(levels), torch.ones(4, 4, dtype=bool)
    )
    out = head.compute_metrics(metrics)
    assert math.isnan(float(out["pdi"])) and not math.isnan(float(out["concordance"]))
    assert math.isnan(float(out["sensitivity/acute"]))
    assert all(math.isnan(row["pdi"]) for row in head.tables(metrics)["per_level"])
    empty = head.metrics()
    assert all(math.isnan(float(v)) for v in head.compute_metrics(empty).values())
    assert head.tables(empty) == {}


# ------------------------------------------------------------------------------------------------ triage labels


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_triage_mapping_levels_and_most_urgent_code(tmp_path):
    table = write(
        tmp_path / "map.csv",
        "code,level,description\n1,normal,a\n2,Abnormal not acute,b\n3,2,c\n4,ACUTE,d\n1,0,a again (same level)\n",
    )
    mapping = load_triage_mapping(table)
    assert mapping == {"1": 0, "2": 1, "3": 2, "4": 3}
    assert triage_level(["1", "3", "99"], mapping) == 2
    assert triage_level([" 4", "1"], mapping) == 3
    assert triage_level(["99"], mapping) is None and triage_level([], mapping) is None
    assert triage_one_hot(1).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert np.isnan(triage_one_hot(None)).all()
    assert parse_level("abnormal-not-acute") == 1


def test_triage_mapping_errors_name_file_and_line(tmp_path):
    bad_level = write(tmp_path / "bad.csv", "code,level,description\n1,normal,a\n2,urgent,b\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 3: code 2: unknown level 'urgent'; expected one of normal"):
        load_triage_mapping(bad_level)
    out_of_range = write(tmp_path / "range.csv", "code,level,description\n1,4,a\n")
    with pytest.raises(ValueError, match=r"range\.csv, line 2: code 1: unknown level '4'"):
        load_triage_mapping(out_of_range)
    duplicate = write(tmp_path / "dup.csv", "code,level,description\n7,normal,a\n8,acute,b\n7,subacute,c\n")
    with pytest.raises(ValueError, match=r"dup\.csv, line 4: code 7 is 'subacute' here but 'normal' on line 2"):
        load_triage_mapping(duplicate)
    no_column = write(tmp_path / "cols.csv", "code,description\n1,a\n")
    with pytest.raises(ValueError, match=r"cols\.csv: missing column\(s\) \['level'\]"):
        load_triage_mapping(no_column)
    empty_code = write(tmp_path / "empty.csv", "code,level,description\n,normal,a\n")
    with pytest.raises(ValueError, match=r"empty\.csv, line 2: empty code"):
        load_triage_mapping(empty_code)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_triage_mapping(tmp_path / "nope.csv")


def label_map_codes(folder: Path, which: str) -> set[str]:
    with open(folder / f"cinc2021_dx_mapping_{which}.csv", newline="") as f:
        return {row["SNOMEDCTCode"] for row in csv.DictReader(f)}


def test_shipped_mapping_covers_the_test_records_and_the_scored_codes(test_data):
    mapping = load_triage_mapping(TRIAGE_RECIPES / "snomed_triage.csv")
    tables = REPO / "ecgfm" / "data" / "label_maps"
    scored, unscored = label_map_codes(tables, "scored"), label_map_codes(tables, "unscored")
    assert scored <= set(mapping)
    assert set(mapping) <= scored | unscored  # real Challenge SNOMED-CT codes only
    used = set()
    for header in (test_data / "cinc2021").glob("*.hea"):
        line = next(x for x in header.read_text().splitlines() if x.startswith("# Dx:"))
        used |= {c.strip() for c in line.split(":", 1)[1].split(",")}
    assert used <= set(mapping)
    assert mapping["426783006"] == 0 and mapping["164931005"] == 3  # sinus rhythm normal, ST elevation acute


def test_challenge_reader_gives_the_triage_level_of_a_real_record(test_data, tmp_path):
    from ecgfm.registry import SOURCES

    folder = test_data / "cinc2021"
    reader = SOURCES.create("challenge", triage_mapping=str(TRIAGE_RECIPES / "snomed_triage.csv"))
    specs = reader.target_specs(reader.find_records(folder))
    assert specs["triage"].kind == "multiclass" and specs["triage"].names == LEVELS
    # E07514: 427084000 sinus tachycardia (abnormal, not acute), 426434006 anterior ischemia (subacute),
    # 59931005 T-wave inversion (abnormal, not acute) -> subacute
    record = reader.read(folder / "E07514")
    assert record.metadata["dx_codes"] == ["427084000", "426434006", "59931005"]
    assert reader.targets(record, specs)["triage"].tolist() == [0.0, 0.0, 1.0, 0.0]
    # HR06001: 426783006 sinus rhythm (normal), 55930002 ST changes (abnormal, not acute) -> abnormal, not acute
    assert reader.targets(reader.read(folder / "HR06001"), specs)["triage"].tolist() == [0.0, 1.0, 0.0, 0.0]
    # a record none of whose codes is mapped has a missing label: E07500 is 67741000119109, 426177001
    only_nsr = write(tmp_path / "nsr.csv", "code,level,description\n426783006,normal,sinus rhythm\n")
    partial = SOURCES.create("challenge", triage_mapping=only_nsr)
    assert np.isnan(partial.targets(partial.read(folder / "E07500"), specs)["triage"]).all()
    # without the option the reader is unchanged: only dx
    plain = SOURCES.create("challenge")
    assert list(plain.target_specs([folder / "E07514"])) == ["dx"]
    assert list(plain.targets(record, {"dx": specs["dx"]})) == ["dx"]


# ------------------------------------------------------------------------------------------------ recipes


def test_shard_recipe_reaches_the_reader_option():
    from ecgfm.commands.shard import shard_parser

    cfg = shard_parser().parse_args(["--config", str(TRIAGE_RECIPES / "shard.yaml")]).as_dict()
    assert cfg["reader"] == "challenge"
    assert cfg["reader_options"] == {"triage_mapping": "recipes/triage/snomed_triage.csv"}
    assert str(cfg["source"]) == "../shared/data/cinc2021"


@pytest.fixture(scope="module")
def triage_shards(test_data, tmp_path_factory) -> Path:
    """The 20 Challenge records in tests/data converted with the shard recipe's options, once for this module."""
    from ecgfm.data.convert import convert
    from ecgfm.data.shards import Manifest

    options = yaml.safe_load((TRIAGE_RECIPES / "shard.yaml").read_text())
    options["source"] = test_data / "cinc2021"
    options["out"] = tmp_path_factory.mktemp("triage-shards")
    options["reader_options"]["triage_mapping"] = str(REPO / options["reader_options"]["triage_mapping"])
    summary = convert(**options, progress=False)
    assert summary.records_read == 20 and not summary.skipped
    assert Manifest.load(options["out"]).targets["triage"].names == LEVELS
    return options["out"]


def test_triage_recipe_fast_dev_run(triage_shards, tmp_path):
    import h5py

    from ecgfm.commands import main
    from ecgfm.data.shards import Manifest

    manifest = Manifest.load(triage_shards)
    with h5py.File(triage_shards / manifest.shards[0]["path"]) as f:
        counts = f["targets/triage"][:].sum(0)
    assert counts.tolist() == [2, 15, 3, 0]  # normal, abnormal not acute, subacute, acute among the 20 records
    args = [
        "fit",
        "--config",
        str(TRIAGE_RECIPES / "net1d-small.yaml"),
        f"--data.root={triage_shards}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",  # one batch of each, as fast_dev_run (which writes no tables) would
    ]
    assert main(args) == 0
    tables = sorted(p.name for p in tmp_path.rglob("tables/*.csv"))
    assert tables == ["val-segment-triage-confusion.csv", "val-segment-triage-per_level.csv"]
