"""Integrations with other libraries. Each is installed by the calls that create STAR routers
(``patch_model`` and the loaders built on it), or explicitly (``star_hf.integrations.peft.install()``);
importing star_hf installs nothing."""
