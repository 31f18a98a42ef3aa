"""Plot training runs: loss, learning rate and every evaluated metric against step, runs overlaid, and each run's
newest sample grid, as one PNG.

    python report.py runs/00000-pid-glyphs16-l2-N12-rho1.5-b32 --out=report.png
    python report.py runs/00000-* runs/00001-* --out=compare.png --dpi=150

Runs are named by their directory's basename. The trainer writes the same figure into each run directory as
`report.png` (off with --plot=false).
"""

import click

from pid.cli import OneLineCommand, check_output_file, user_errors


@click.command(cls=OneLineCommand, context_settings=dict(help_option_names=["-h", "--help"]))
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--out", default="report.png", show_default=True, help="Output PNG")
@click.option("--dpi", type=click.FloatRange(min=10, max=1000), default=100, show_default=True,
              help="Pixels per inch (each panel is 4 x 3 inches, 3 panels per row)")
@click.option("--skip-bad-lines", is_flag=True,
              help="Skip damaged jsonl lines (a killed run's truncated last line) instead of stopping")
@user_errors
def main(run_dirs, out, dpi, skip_bad_lines):
    """Draw the curves of one or more run directories into one PNG."""
    from pid.report import read_run, report_names, write_report
    check_output_file(out, "--out", (".png",))
    names = report_names(run_dirs)
    runs = [read_run(d, names[d], strict=not skip_bad_lines) for d in run_dirs]
    write_report(runs, out, dpi)
    click.echo(out)


if __name__ == "__main__":
    main()
