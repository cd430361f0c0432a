"""The feature explorer: a Streamlit app over shard folders, SAE runs and their inference outputs.

`traitscope app` (cli.py) starts `streamlit run main.py`; data.py reads the files (no Streamlit),
blind.py runs the blind interpretability test, encode.py computes codes for one image on the fly.
"""
