"""mma: pluggable parameter-efficient adapters for frozen vision-language backbones."""
