"""The remote-code files of a DFlash drafter repo. Installed as `dflash_hf.modeling`; exported verbatim."""
