"""Preference data: schema detection, ties, bad input, label flipping and the collator."""

import io

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from trl_adaptive.data import PreferenceCollator, detect_schema, flip_labels, prepare_preference_dataset

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (128, 128, 128)


def png(colour, size=(16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def pickapic(labels, first=WHITE, second=BLACK):
    """Pick-a-Pic rows: jpg_0 is `first`, jpg_1 is `second`, label_0 as given (label_1 its complement)."""
    return Dataset.from_list(
        [
            {
                "caption": f"prompt {i}",
                "jpg_0": png(first),
                "jpg_1": png(second),
                "label_0": label,
                "label_1": None if label is None else 1.0 - float(label) if label in (0, 0.5, 1) else 0.0,
            }
            for i, label in enumerate(labels)
        ]
    )


def hpdv2(preferences, tmp_path):
    """HPDv2 train rows: two file paths per row, `human_preference` marks the preferred one with 1."""
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    first.write_bytes(png(WHITE))
    second.write_bytes(png(BLACK))
    return Dataset.from_list(
        [
            {"prompt": f"prompt {i}", "file_path": [str(first), str(second)], "human_preference": pref}
            for i, pref in enumerate(preferences)
        ]
    )


def trl_style(n):
    return Dataset.from_list(
        [{"prompt": f"prompt {i}", "chosen": png(WHITE), "rejected": png((i, i, i))} for i in range(n)]
    )


def collate(dataset, resolution=16, **kwargs):
    dataset, _ = prepare_preference_dataset(dataset, drop_ties=kwargs.pop("drop_ties", True))
    collator = PreferenceCollator(detect_schema(dataset.column_names), resolution, **kwargs)
    return collator([dataset[i] for i in range(len(dataset))])


# ---- schema detection --------------------------------------------------------------------------------------


def test_detects_each_schema(tmp_path):
    assert detect_schema(pickapic([1]).column_names).name == "pickapic"
    assert detect_schema(trl_style(1).column_names).name == "trl"
    schema = detect_schema(hpdv2([[1, 0]], tmp_path).column_names)
    assert schema.name == "hpdv2"
    assert schema.image_columns == ("file_path",)
    assert detect_schema(["prompt", "image", "human_preference"]).image_columns == ("image",)


def test_unknown_columns_name_the_expected_schemas():
    with pytest.raises(ValueError, match="Pick-a-Pic.*TRL.*HPDv2"):
        detect_schema(["text", "picture"])


@pytest.mark.parametrize(
    "columns, missing",
    [
        (["caption", "jpg_0", "label_0"], "jpg_1"),
        (["caption", "jpg_0", "jpg_1"], "label_0"),
        (["prompt", "chosen"], "rejected"),
        (["image", "human_preference"], "prompt"),
    ],
)
def test_missing_column_is_named(columns, missing):
    with pytest.raises(ValueError, match=f"missing column.*'{missing}'"):
        detect_schema(columns)


# ---- ties and labels ---------------------------------------------------------------------------------------


def test_ties_are_dropped_and_counted():
    dataset, info = prepare_preference_dataset(pickapic([1, 0.5, 0, 0.5, 1]))
    assert info == {"schema": "pickapic", "num_rows": 3, "num_ties": 2, "ties_dropped": True, "num_bad_rows": 0,
                    "bad_rows": []}
    assert dataset["row_index"] == [0, 2, 4]  # positions in the dataset as given, for error messages


def test_ties_are_kept_with_drop_ties_false():
    dataset, info = prepare_preference_dataset(pickapic([1, 0.5, 0, 0.5, 1]), drop_ties=False)
    assert info["num_rows"] == 5 and info["num_ties"] == 2 and info["ties_dropped"] is False
    assert dataset["label_0"] == [1, 0.5, 0, 0.5, 1]


def test_hpdv2_ties_are_dropped(tmp_path):
    dataset, info = prepare_preference_dataset(hpdv2([[1, 0], [0.5, 0.5], [0, 1]], tmp_path))
    assert (info["num_rows"], info["num_ties"]) == (2, 1)
    assert dataset["row_index"] == [0, 2]


def test_kept_ties_train_with_the_first_image_as_winner():
    batch = collate(pickapic([0, 0.5], first=WHITE, second=BLACK), drop_ties=False)
    assert torch.all(batch["pixel_values_chosen"][0] == -1.0)  # label 0: the second (black) image won
    assert torch.all(batch["pixel_values_chosen"][1] == 1.0)  # tie: the first (white) image is put first


@pytest.mark.parametrize("bad", [2.0, -1.0, 0.3])
def test_label_outside_valid_set_names_row_and_column(bad):
    with pytest.raises(ValueError, match=r"row 3, column 'label_0'.*not in \{0, 0.5, 1\}"):
        prepare_preference_dataset(pickapic([1, 0, 1, bad, 0]))


def test_missing_label_names_row_and_column():
    with pytest.raises(ValueError, match="row 1, column 'label_0'"):
        prepare_preference_dataset(pickapic([1, None]))


def test_bad_hpdv2_preference_names_row_and_column(tmp_path):
    with pytest.raises(ValueError, match="row 1, column 'human_preference'.*2"):
        prepare_preference_dataset(hpdv2([[1, 0], [0, 2]], tmp_path))
    with pytest.raises(ValueError, match="row 0, column 'human_preference'.*pair"):
        prepare_preference_dataset(hpdv2([[1]], tmp_path))


def test_undecodable_image_names_row_and_column_when_collated():
    rows = pickapic([0.5, 1, 1]).to_list()
    rows[2]["jpg_1"] = b"this is not an image"
    dataset, _ = prepare_preference_dataset(Dataset.from_list(rows))  # labels are fine: no error yet
    collator = PreferenceCollator(detect_schema(dataset.column_names), 16)
    collator([dataset[0]])  # row 1 decodes
    # the tie at row 0 was dropped, yet the message gives the row's position in the dataset the user passed
    with pytest.raises(ValueError, match="row 2, column 'jpg_1': cannot decode image"):
        collator([dataset[1]])


def test_missing_image_file_names_row_and_column(tmp_path):
    dataset = hpdv2([[1, 0]], tmp_path)
    (tmp_path / "second.png").unlink()
    with pytest.raises(ValueError, match="row 0, column 'file_path': cannot decode image"):
        collate(dataset)


# ---- bad rows, found before training -------------------------------------------------------------------------


def with_bad_rows():
    """Seven Pick-a-Pic rows: row 2 has an undecodable jpg_1, row 4 a label of 2, row 5 no prompt, row 6 a tie."""
    rows = pickapic([1, 0, 1, 1, 1, 0, 0.5]).to_list()
    rows[2]["jpg_1"] = b"this is not an image"
    rows[4]["label_0"] = 2.0
    rows[5]["caption"] = None
    return Dataset.from_list(rows)


def test_image_check_names_every_bad_row_before_training():
    with pytest.raises(ValueError) as error:
        prepare_preference_dataset(with_bad_rows(), check_images=True)
    message = str(error.value)
    assert message.startswith("3 bad row(s)")
    assert "row 2, column 'jpg_1': cannot decode image" in message
    assert "row 4, column 'label_0'" in message and "row 5, column 'caption': expected a string" in message
    assert "skip_bad_rows=True" in message


def test_bad_labels_and_prompts_are_found_without_the_image_check():
    with pytest.raises(ValueError, match="^2 bad row"):
        prepare_preference_dataset(with_bad_rows())


def test_skip_bad_rows_drops_and_lists_them():
    dataset, info = prepare_preference_dataset(with_bad_rows(), check_images=True, skip_bad_rows=True, progress=False)
    assert dataset["row_index"] == [0, 1, 3]  # bad rows 2, 4, 5 and the tie at 6 dropped
    assert info["num_bad_rows"] == 3 and info["num_rows"] == 3 and info["num_ties"] == 1
    assert [(r["row"], r["column"]) for r in info["bad_rows"]] == [(2, "jpg_1"), (4, "label_0"), (5, "caption")]
    collate(dataset)  # what is left collates


def test_image_check_reads_datasets_image_columns_undecoded():
    """A corrupt image in a `datasets.Image` column is reported with its row, not raised inside `datasets`."""
    from datasets import Image as ImageFeature

    rows = trl_style(4).to_list()
    rows[3]["rejected"] = {"bytes": b"not a png", "path": None}
    rows = [{**r, "chosen": {"bytes": r["chosen"], "path": None}} if isinstance(r["chosen"], bytes) else r for r in rows]
    rows = [{**r, "rejected": {"bytes": r["rejected"], "path": None}} if isinstance(r["rejected"], bytes) else r
            for r in rows]
    dataset = Dataset.from_list(rows).cast_column("chosen", ImageFeature()).cast_column("rejected", ImageFeature())
    with pytest.raises(ValueError, match="row 3, column 'rejected': cannot decode image"):
        prepare_preference_dataset(dataset, check_images=True, progress=False)


def test_image_check_finds_a_missing_hpdv2_file_in_parallel(tmp_path):
    dataset = hpdv2([[1, 0], [0, 1], [1, 0], [0, 1]], tmp_path)
    rows = dataset.to_list()
    rows[1]["file_path"] = [rows[1]["file_path"][0], str(tmp_path / "missing.png")]
    with pytest.raises(ValueError, match="^1 bad row.*row 1, column 'file_path': cannot decode image"):
        prepare_preference_dataset(Dataset.from_list(rows), check_images=True, num_proc=2, progress=False)


def test_flip_labels_leaves_invalid_labels_for_the_check_to_report():
    flipped = flip_labels(pickapic([1, 0, 2.0, 1]), rate=1.0, seed=0)
    assert flipped["flipped"] == [True, True, False, True]


# ---- flip_labels ---------------------------------------------------------------------------------------------

LABELS = [1, 0, 1, 0.5, 0, 1, 1, 0, 0.5, 1, 0, 1]  # 10 decided pairs, 2 ties


def test_flip_labels_pickapic():
    dataset = pickapic(LABELS)
    flipped = flip_labels(dataset, rate=0.3, seed=0)
    mask = flipped["flipped"]
    assert flipped.features["flipped"].dtype == "bool"
    assert sum(mask) == 3  # round(0.3 * 10 decided pairs)
    assert not mask[3] and not mask[8]  # ties are never flipped
    for before, after, was_flipped in zip(dataset, flipped, mask):
        if was_flipped:
            assert after["label_0"] == 1 - before["label_0"] and after["label_1"] == 1 - before["label_1"]
        else:
            assert after["label_0"] == before["label_0"]
    assert flip_labels(dataset, rate=0.3, seed=0)["flipped"] == mask  # deterministic for a seed
    assert flip_labels(dataset, rate=0.3, seed=1)["flipped"] != mask
    assert sum(flip_labels(dataset, rate=0.0, seed=0)["flipped"]) == 0
    assert sum(flip_labels(dataset, rate=1.0, seed=0)["flipped"]) == 10


def test_flip_labels_hpdv2(tmp_path):
    preferences = [[1, 0] if label == 1 else [0, 1] if label == 0 else [0.5, 0.5] for label in LABELS]
    dataset = hpdv2(preferences, tmp_path)
    flipped = flip_labels(dataset, rate=0.2, seed=3)
    mask = flipped["flipped"]
    assert flipped.features["flipped"].dtype == "bool"
    assert sum(mask) == 2
    for before, after, was_flipped in zip(preferences, flipped["human_preference"], mask):
        assert after == (before[::-1] if was_flipped else before)
    assert flip_labels(dataset, rate=0.2, seed=3)["flipped"] == mask


def test_flip_labels_trl_swaps_images():
    dataset = trl_style(10)
    flipped = flip_labels(dataset, rate=0.5, seed=0)
    mask = flipped["flipped"]
    assert sum(mask) == 5
    for before, after, was_flipped in zip(dataset, flipped, mask):
        if was_flipped:
            assert (after["chosen"], after["rejected"]) == (before["rejected"], before["chosen"])
        else:
            assert (after["chosen"], after["rejected"]) == (before["chosen"], before["rejected"])
    assert flip_labels(dataset, rate=0.5, seed=0)["flipped"] == mask


def test_flip_labels_rejects_bad_rate():
    with pytest.raises(ValueError, match="rate"):
        flip_labels(pickapic([1]), rate=1.5)


# ---- collator ----------------------------------------------------------------------------------------------


def test_collator_shapes_and_keys():
    batch = collate(pickapic([1, 0, 1]), resolution=16)
    assert batch["pixel_values_chosen"].shape == (3, 3, 16, 16)
    assert batch["pixel_values_rejected"].shape == (3, 3, 16, 16)
    assert batch["prompts"] == ["prompt 0", "prompt 1", "prompt 2"]
    assert batch["row_index"].tolist() == [0, 1, 2]
    for key in ("original_size_chosen", "original_size_rejected", "crop_top_left_chosen", "crop_top_left_rejected"):
        assert batch[key].shape == (3, 2)
    assert batch["pixel_values_chosen"].min() >= -1 and batch["pixel_values_chosen"].max() <= 1
    assert "flipped" not in batch


def test_collator_puts_the_winner_first():
    # jpg_0 white, jpg_1 black; label_0 = 0 means jpg_1 (black) won and must come out as "chosen"
    batch = collate(pickapic([1, 0]))
    chosen, rejected = batch["pixel_values_chosen"], batch["pixel_values_rejected"]
    assert torch.all(chosen[0] == 1.0) and torch.all(rejected[0] == -1.0)
    assert torch.all(chosen[1] == -1.0) and torch.all(rejected[1] == 1.0)


def test_collator_winner_after_hpdv2_and_flip(tmp_path):
    batch = collate(hpdv2([[1, 0], [0, 1]], tmp_path))
    assert torch.all(batch["pixel_values_chosen"][0] == 1.0) and torch.all(batch["pixel_values_chosen"][1] == -1.0)
    flipped = flip_labels(pickapic([1, 1, 1, 1]), rate=0.5, seed=0)
    batch = collate(flipped)
    winner_is_white = (batch["pixel_values_chosen"] == 1.0).flatten(1).all(dim=1)
    assert batch["flipped"].dtype == torch.bool
    assert winner_is_white.tolist() == [not f for f in flipped["flipped"]]


def test_collator_resizes_and_records_sizes():
    rows = [{"prompt": "p", "chosen": png(WHITE, size=(40, 24)), "rejected": png(BLACK, size=(24, 40))}]
    batch = collate(Dataset.from_list(rows), resolution=16)
    assert batch["pixel_values_chosen"].shape == (1, 3, 16, 16)
    assert batch["original_size_chosen"].tolist() == [[24, 40]]  # (height, width)
    assert batch["original_size_rejected"].tolist() == [[40, 24]]
    # centre crop of the 27x16 resize: 11 spare columns -> left 6 (round(5.5) = 6 under banker's rounding)
    assert batch["crop_top_left_chosen"].tolist() == [[0, 6]]


def test_random_augmentation_depends_on_seed_epoch_and_row_only():
    half = np.zeros((16, 16, 3), dtype=np.uint8)
    half[:, :8] = 255  # left half white: a horizontal flip is visible
    buffer = io.BytesIO()
    Image.fromarray(half).save(buffer, format="PNG")
    rows = [{"prompt": f"p{i}", "chosen": buffer.getvalue(), "rejected": png(GREY)} for i in range(16)]
    dataset, _ = prepare_preference_dataset(Dataset.from_list(rows))
    collator = PreferenceCollator(detect_schema(dataset.column_names), 16, random_flip=True, empty_prompt_probability=0.5)

    def draws(order):
        order = list(order)
        batch = collator([dataset[i] for i in order])
        flips = (batch["pixel_values_chosen"][:, 0, 0, 0] < 0).tolist()  # top-left pixel black -> flipped
        empty = [p == "" for p in batch["prompts"]]
        return {i: (f, e) for i, f, e in zip(order, flips, empty)}

    epoch0 = draws(range(16))
    assert draws(reversed(range(16))) == epoch0  # batch composition and order do not matter
    assert 0 < sum(f for f, _ in epoch0.values()) < 16 and 0 < sum(e for _, e in epoch0.values()) < 16
    collator.set_epoch(1)
    assert draws(range(16)) != epoch0


# ---- a judge's scores (the minority filter's `judge` evidence) ----------------------------------------------


class BrightnessJudge:
    """A scorer with the `trl_adaptive.evaluation` interface: an image's mean grey level in [0, 1]."""

    def __init__(self):
        self.calls = 0

    def score(self, images, prompts):
        self.calls += 1
        assert len(images) == len(prompts)
        return torch.tensor([np.asarray(image.convert("L"), dtype=np.float64).mean() / 255 for image in images])


def test_judge_scores_follow_the_images_and_the_margin_the_label():
    from trl_adaptive.data import JUDGE_SCORES_COLUMN, add_judge_scores

    # jpg_0 white (1.0), jpg_1 black (0.0); label_0 = 0 makes the black image the winner: margin -1 there.
    judge = BrightnessJudge()
    scored = add_judge_scores(pickapic([1, 0, 1]), judge, batch_size=2, progress=False)
    assert judge.calls == 2  # batches of two rows: each call scores both images of its rows
    assert list(scored[JUDGE_SCORES_COLUMN]) == [[1.0, 0.0]] * 3
    assert collate(scored)["judge_margin"].tolist() == [1.0, -1.0, 1.0]
    assert "judge_margin" not in collate(pickapic([1, 0]))
    # TRL schema: a flip swaps the images, and the scores go with them, whether scored before or after the flip.
    dataset = trl_style(6)
    before = flip_labels(add_judge_scores(dataset, BrightnessJudge(), progress=False), rate=0.5, seed=1)
    after = add_judge_scores(flip_labels(dataset, rate=0.5, seed=1), BrightnessJudge(), progress=False)
    np.testing.assert_allclose(np.array(list(before[JUDGE_SCORES_COLUMN])), np.array(list(after[JUDGE_SCORES_COLUMN])))
    margins, flipped = collate(after)["judge_margin"], torch.tensor(after["flipped"])
    assert bool((margins[flipped] < 0).all()) and bool((margins[~flipped] > 0).all())
    # Scoring again replaces the column; None is a row the judge abstains on (NaN margin).
    rescored = add_judge_scores(scored, BrightnessJudge(), progress=False)
    assert rescored.column_names.count(JUDGE_SCORES_COLUMN) == 1
    abstains = scored.remove_columns(JUDGE_SCORES_COLUMN).add_column(JUDGE_SCORES_COLUMN, [None, [0.2, 0.3], [1, 0]])
    assert torch.isnan(collate(abstains)["judge_margin"][0])


def test_judge_label_agreement_counts_decided_pairs_by_hand():
    from trl_adaptive.data import JUDGE_SCORES_COLUMN, add_judge_scores, judge_label_agreement

    # The judge prefers white (jpg_0) on every row: label_0 = 1 agrees, 0 disagrees, 0.5 is a tie and does not count.
    scored = add_judge_scores(pickapic([1, 0, 1, 1, 0.5]), BrightnessJudge(), progress=False)
    assert judge_label_agreement(scored) == {"agreement": 0.75, "pairs": 4, "abstained": 0}
    # A judge that abstains (None) or scores both images alike casts no vote.
    votes = [None, [0.3, 0.3], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    mixed = scored.remove_columns(JUDGE_SCORES_COLUMN).add_column(JUDGE_SCORES_COLUMN, votes)
    assert judge_label_agreement(mixed) == {"agreement": 0.5, "pairs": 2, "abstained": 2}
    # TRL schema: flipped rows swap their images and scores, so the judge agrees exactly with the unflipped ones.
    flipped = flip_labels(add_judge_scores(trl_style(6), BrightnessJudge(), progress=False), rate=0.5, seed=1)
    assert 0 < sum(flipped["flipped"]) < 6
    assert judge_label_agreement(flipped)["agreement"] == pytest.approx(1 - np.mean(flipped["flipped"]))
    with pytest.raises(ValueError, match="judge_scores.*add_judge_scores"):
        judge_label_agreement(pickapic([1, 0]))
    with pytest.raises(ValueError, match="map-style"):
        judge_label_agreement(scored.to_iterable_dataset())


@pytest.mark.parametrize("bad", [[0.5], [0.1, 0.2, 0.3], [0.1, float("nan")]])
def test_bad_judge_scores_name_row_and_column(bad):
    from trl_adaptive.data import JUDGE_SCORES_COLUMN

    dataset = pickapic([1, 1]).add_column(JUDGE_SCORES_COLUMN, [[0.1, 0.2], bad])
    with pytest.raises(ValueError, match=r"row 1, column 'judge_scores'"):
        prepare_preference_dataset(dataset)
