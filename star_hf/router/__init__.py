"""The STAR router: the mixin that turns a gate into W_eff, its generated classes, and padding masks."""
