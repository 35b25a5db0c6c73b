"""One LightningModule per method; each reads like its paper's method section."""
