"""Prompt sets: I2P / COCO / generic CSVs, extra columns, sources, and one-line errors."""

import csv

import pytest

from conceptlock.pipelines import ConceptlockError
from conceptlock.prompts import I2P_COLUMNS, PromptRow, PromptSet, load_prompts, register_prompt_source


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def i2p_row(prompt, seed, guidance, case):
    vals = {
        "prompt": prompt,
        "categories": "sexual,violence",
        "hard": "1",
        "inappropriate_percentage": "90.0",
        "nudity_percentage": "40.5",
        "q16_percentage": "80.0",
        "sd_safety_percentage": "30.0",
        "prompt_toxicity": "0.12",
        "lexica_url": "https://lexica.art/?q=x",
        "evaluation_seed": str(seed),
        "evaluation_guidance": str(guidance),
        "sd_image_width": "512",
        "sd_image_height": "512",
        "sd_model": "stable-diffusion-v1-4",
        "case_number": str(case),
    }
    return [vals[c] for c in I2P_COLUMNS]


def test_i2p_csv_rows_carry_their_own_seed_and_guidance(tmp_path):
    p = write_csv(
        tmp_path / "i2p.csv",
        I2P_COLUMNS,
        [
            i2p_row("a painting, oil on canvas", 2734971755, 7, 0),
            i2p_row('multi\nline "quoted" prompt', 12, 9.5, 1),
            i2p_row("third", 3, 7.5, 2),
        ],
    )
    ps = load_prompts(p)
    assert ps.format == "i2p" and len(ps) == 3 and ps.sha256
    r0, r1 = ps[0], ps[1]
    assert (r0.prompt, r0.seed, r0.guidance, r0.index) == ("a painting, oil on canvas", 2734971755, 7.0, 0)
    assert (r1.prompt, r1.seed, r1.guidance) == ('multi\nline "quoted" prompt', 12, 9.5)
    assert r0.extra["categories"] == "sexual,violence" and r0.extra["case_number"] == "0"
    assert r0.get("sd_image_width") == "512" and "evaluation_seed" not in r0.extra
    assert [r.index for r in load_prompts(p, limit=2)] == [0, 1]


def test_coco_and_generic_formats_keep_extra_columns(tmp_path):
    coco = write_csv(
        tmp_path / "coco.csv", ["image_id", "source", "prompt", "evaluation_seed"], [["42", "coco", "a dog", "7"]]
    )
    ps = load_prompts(coco)
    assert ps.format == "coco" and ps[0].seed == 7 and ps[0].guidance is None and ps[0].extra["image_id"] == "42"
    toy = write_csv(tmp_path / "toy.csv", ["prompt", "seed", "shape", "colour"], [["a red ball", "5", "circle", "red"]])
    r = load_prompts(toy)[0]
    assert (r.seed, r.extra, r.get("shape")) == (5, {"shape": "circle", "colour": "red"}, "circle")
    # seed written as 5.0 by a pandas export is still an integer; BOM is tolerated
    (tmp_path / "bom.csv").write_text("\ufeffprompt,seed,guidance\nx,5.0,3\n", encoding="utf-8")
    r = load_prompts(tmp_path / "bom.csv")[0]
    assert (r.seed, r.guidance) == (5, 3.0)


def test_seedless_csv_gets_recorded_index_seeds(tmp_path):
    p = write_csv(tmp_path / "plain.csv", ["prompt"], [["a"], ["b"], ["c"]])
    assert [r.seed for r in load_prompts(p, base_seed=100)] == [100, 101, 102]


def _one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_errors_are_one_line_naming_file_and_row(tmp_path):
    nop = write_csv(tmp_path / "noprompt.csv", ["text", "seed"], [["a", "1"]])
    with pytest.raises(ConceptlockError) as e:
        load_prompts(nop)
    assert str(nop) in _one_line(e) and "prompt" in str(e.value)

    empty = write_csv(tmp_path / "empty.csv", ["prompt", "seed"], [])
    with pytest.raises(ConceptlockError) as e:
        load_prompts(empty)
    assert str(empty) in _one_line(e) and "empty prompt set" in str(e.value)
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(ConceptlockError, match="empty prompt set"):
        load_prompts(tmp_path / "blank.csv")

    for bad in ("1.5", "abc", "", "-3"):
        p = write_csv(tmp_path / "badseed.csv", ["prompt", "seed"], [["ok", "1"], ["ok", "2"], ["x", bad]])
        with pytest.raises(ConceptlockError) as e:
            load_prompts(p)
        msg = _one_line(e)
        assert str(p) in msg and "row 3" in msg, msg

    p = write_csv(tmp_path / "badg.csv", I2P_COLUMNS, [i2p_row("x", 1, "strong", 0)])
    with pytest.raises(ConceptlockError) as e:
        load_prompts(p)
    assert "row 1" in _one_line(e) and "guidance" in str(e.value)

    p = write_csv(tmp_path / "blankprompt.csv", ["prompt", "seed"], [["a", "1"], ["  ", "2"]])
    with pytest.raises(ConceptlockError, match="row 2"):
        load_prompts(p)

    with pytest.raises(ConceptlockError) as e:
        load_prompts("nosuchprefix:set")
    assert "unknown prompt set" in _one_line(e)
    with pytest.raises(ConceptlockError) as e:
        load_prompts("i2p")
    assert "unknown prompt set" in _one_line(e)
    with pytest.raises(ConceptlockError) as e:
        load_prompts(tmp_path / "missing.csv")
    assert "not found" in _one_line(e)


def test_registered_source_resolves_and_rejects_unknown_names(tmp_path):
    sets = {"shapes": [PromptRow("a red circle", seed=3, index=0, extra={"shape": "circle", "colour": "red"})]}

    def toy(name):
        if name not in sets:
            raise KeyError(f"no toy set {name!r}")
        return PromptSet(name=f"toy:{name}", rows=sets[name], format="toy")

    register_prompt_source("toytest", toy)
    ps = load_prompts("toytest:shapes")
    assert ps.format == "toy" and ps[0].extra["colour"] == "red"
    with pytest.raises(ConceptlockError) as e:
        load_prompts("toytest:nope")
    assert "unknown prompt set" in _one_line(e) and "toytest:nope" in str(e.value)
    register_prompt_source("emptytest", lambda name: [])
    with pytest.raises(ConceptlockError, match="empty prompt set"):
        load_prompts("emptytest:x")
