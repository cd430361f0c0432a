"""Tests mirror the package (tests/sae/ tests src/traitscope/sae/, ...); helpers shared across folders
live beside this file (`locations`, `app_fixtures`), which pytest puts on the import path."""
