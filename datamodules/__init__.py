"""DataModules: prompt templates, image sets (+ masks, + pairs), index-addressed training streams."""
