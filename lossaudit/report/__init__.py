"""The report and its renderings: JSON, CSV, Markdown, HTML with plots, the terminal, the report
directory."""
