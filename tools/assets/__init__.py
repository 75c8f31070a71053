"""The build of the bundled assets and of the large corpus from pinned packages (build_assets.py)."""
