"""The `p2pfed` command line: each command parses, calls one library function, prints.

Expected failures print one line (message and hint) on stderr and exit with the
error's documented code (README.md, "Exit codes"); never a traceback."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console

from p2pfed.errors import P2PFedError, UsageError
from p2pfed.federation import Settings, parse_duration
from p2pfed.site import home_root

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _reader_is_gone() -> None:
    """`p2pfed status | head`: the reader has all it wanted. Exit 0, quietly."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0)


class _Stdout(Console):
    on_broken_pipe = staticmethod(_reader_is_gone)  # rich's own exits 1


out = _Stdout(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

HomeOpt = typer.Option(None, "--home", envvar="P2PFED_HOME",
                       help="Folder holding the sites' keys and state (default: ~/.p2pfed).")
SiteOpt = typer.Option(..., "--site", help="This site's name, as in the federation.")


def _typer_help_like_click() -> None:
    """Typer 0.29 shows `<str>`, `<bool>` and `{storage}` in help; other Typer tools
    (and click) show TEXT, nothing for flags, and STORAGE. Restore that look."""
    from typer import core

    base, argument = getattr(core, "_TyperParameter", None), core.TyperArgument
    if base is None or not hasattr(argument, "_usage_display_name"):
        return  # another Typer: its own look
    names = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "bool": None}
    original = base.display_type

    def display_type(self, ctx):
        if getattr(self, "is_flag", False):
            return None
        label = original(self, ctx).strip("<>")
        return names.get(label, label.upper())

    base.display_type = display_type
    argument.display_name_raw = property(lambda self: self.metavar or self.name.upper())
    argument._usage_display_name = lambda self: self.display_name_raw if self.required else f"[{self.display_name_raw}]"


_typer_help_like_click()


def _version(value: bool) -> None:
    if value:
        from p2pfed.federation import version_of

        out.print(f"p2pfed {version_of('p2pfed')} (nnunetv2 {version_of('nnunetv2')})", markup=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the versions of p2pfed and nnU-Net and exit.")) -> None:
    """Serverless federated nnU-Net: FFE and AsymFedAvg over shared storage, encrypted and
    signed. Each site runs `p2pfed round --site NAME` from cron."""


TICKING = ("round_", "run")


def fail(exc: P2PFedError) -> None:
    hint, ctx = exc.hint, click.get_current_context(silent=True)
    if hint == UsageError.default_hint and ctx is not None:
        hint = f"see `p2pfed {ctx.info_name} --help`"
    line = f"p2pfed: error: {exc.message}" + (f" (hint: {hint})" if hint else "")
    err.print(line, markup=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def handled(fn):
    """Turn expected errors into one line; log unexpected ones to a file, not the screen."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, while we can still handle it
            return result
        except P2PFedError as exc:
            fail(exc)
        except BrokenPipeError:
            _reader_is_gone()
        except KeyboardInterrupt:
            resumes = "; the next tick resumes where this one stopped" if fn.__name__ in TICKING else ""
            err.print(f"p2pfed: interrupted{resumes}", markup=False, soft_wrap=True)
            raise typer.Exit(130)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug: keep the screen to one line, the details in a file
            log = _crash_log(kwargs.get("home"))
            err.print(f"p2pfed: internal error: {type(exc).__name__}: {exc} (details: {log})",
                      markup=False, soft_wrap=True)
            raise typer.Exit(1)

    return wrapper


def _crash_log(home) -> Path:
    root = home_root(home)
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"crash-{time.strftime('%Y%m%dT%H%M%S')}.log"
        path.write_text(traceback.format_exc())
    except OSError:
        path = Path("(unwritable home; traceback lost)")
    return path


def emit_json(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- membership
def _local_options(site, dataset, nnunet_raw, nnunet_preprocessed, nnunet_results, device, endpoint, home):
    from p2pfed.node import LocalOptions

    return LocalOptions(site=site, dataset=dataset, nnunet_raw=nnunet_raw,
                        nnunet_preprocessed=nnunet_preprocessed, nnunet_results=nnunet_results,
                        device=device, endpoint_url=endpoint, home=home)


Dataset = typer.Option(..., "--dataset", "-d", help="This site's nnU-Net dataset id or DatasetXXX_Name.")
Raw = typer.Option(None, "--nnunet-raw", help="nnUNet_raw folder (default: $nnUNet_raw).")
Pre = typer.Option(None, "--nnunet-preprocessed", help="nnUNet_preprocessed (default: $nnUNet_preprocessed).")
Res = typer.Option(None, "--nnunet-results", help="nnUNet_results folder (default: $nnUNet_results).")
Device = typer.Option("cpu", "--device", help="cpu, cuda or mps.")
# one flag, not a --x/--no-x pair: rich gives a pair its own column and truncates long option names
NoFinalValidation = typer.Option(False, "--no-final-validation",
                                 help="Skip nnU-Net's validation of the final model (run by default).")
FinalValidation = typer.Option(True, "--final-validation", hidden=True, help="The default.")
Endpoint = typer.Option(None, "--endpoint", help="S3 endpoint URL (MinIO, ...) (default: the one recorded at "
                        "init/join, else $AWS_ENDPOINT_URL).")


def _secure_default(sites: int, on: bool, off: bool) -> bool:
    if on and off:
        raise UsageError("--secure-aggregation and --no-secure-aggregation exclude each other")
    return on or (not off and sites >= 3)


@app.command()
@handled
def init(
    storage: str = typer.Argument(..., help="Shared storage: a folder, file://, or s3://bucket/prefix."),
    site: str = SiteOpt, dataset: str = Dataset,
    mode: str = typer.Option("ffe", "--mode", help="ffe (one shared plan, FedAvg) or asym (local plans, AsymFedAvg)."),
    configuration: str = typer.Option("3d_fullres", "--configuration", "-c", help="nnU-Net configuration."),
    fold: int = typer.Option(0, "--fold", "-f", help="nnU-Net fold used for local validation."),
    rounds: int = typer.Option(1000, "--rounds", help="Number of federated rounds."),
    epochs_per_round: int = typer.Option(1, "--epochs-per-round", help="Local epochs between merges."),
    iterations_per_epoch: int = typer.Option(250, "--iterations-per-epoch", help="nnU-Net iterations per epoch."),
    val_iterations: int = typer.Option(50, "--val-iterations", help="nnU-Net validation iterations per epoch."),
    sites: int = typer.Option(2, "--sites", help="Members that must publish fingerprints before the federation starts."),
    quorum: Optional[int] = typer.Option(None, "--quorum", help="Contributions that may seal a round after the deadline (default: all sites)."),
    deadline: str = typer.Option("24h", "--deadline", help="How long a round waits for all sites before the quorum may seal it (e.g. 30m, 6h)."),
    weighting: str = typer.Option("cases", "--weighting", help="cases (weight by training cases) or uniform."),
    layers: str = typer.Option("subset", "--layers", help="subset (average each layer over sites that share it) or intersection."),
    trainer: str = typer.Option("nnUNetTrainer", "--trainer", help="nnU-Net trainer class."),
    planner: str = typer.Option("ExperimentPlanner", "--planner", help="nnU-Net experiment planner class."),
    plans_identifier: str = typer.Option("nnUNetPlans", "--plans-identifier", "-p", help="nnU-Net plans identifier."),
    gpu_memory_target: float = typer.Option(8.0, "--gpu-memory-target", help="GPU memory target of the planner, GB."),
    no_final_validation: bool = NoFinalValidation, _final_validation: bool = FinalValidation,
    max_update_norm: Optional[float] = typer.Option(None, "--max-update-norm", help="Refuse updates whose L2 distance to the base model exceeds this times the base model's norm (off by default)."),
    max_weight_share: Optional[float] = typer.Option(None, "--max-weight-share", help="Cap any one contributor's share of a merge's total weight at S, 0 < S <= 1 (off by default)."),
    admission_quorum: Optional[int] = typer.Option(None, "--admission-quorum", help="Members who must approve each admission, removal or key rotation (default and minimum: a majority of the members)."),
    secure_aggregation: bool = typer.Option(False, "--secure-aggregation", help="Members learn only the sum of the updates, never one site's (the default for --sites 3 or more; fixed for the federation's life)."),
    no_secure_aggregation: bool = typer.Option(False, "--no-secure-aggregation", help="Every member can read every site's update (the default below 3 sites)."),
    dp_clip: Optional[float] = typer.Option(None, "--dp-clip", help="Differential privacy: clip each site's update to this L2 norm (needs secure aggregation, --mode ffe and --weighting uniform)."),
    dp_noise_multiplier: Optional[float] = typer.Option(None, "--dp-noise-multiplier", help="Differential privacy: the aggregate's noise std over --dp-clip."),
    dp_delta: float = typer.Option(1e-5, "--dp-delta", help="Differential privacy: the delta that epsilon is reported for."),
    sharded_from: int = typer.Option(8, "--sharded-from", help="Secure rounds with at least this many sites split the merge among them, so no site downloads every contribution."),
    optimizer_state: str = typer.Option("local", "--optimizer-state", help="Each site's SGD momentum after a merge: local (kept from its own last round, as the reference FednnU-Net), reset (started afresh each round) or merged (averaged with the weights and uploaded with them; --mode ffe)."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", help="Every site's initial learning rate, where nnU-Net's PolyLR schedule starts (default: the trainer's own, 0.01 for nnUNetTrainer)."),
    nnunet_raw: Optional[str] = Raw, nnunet_preprocessed: Optional[str] = Pre,
    nnunet_results: Optional[str] = Res, device: str = Device,
    endpoint: Optional[str] = Endpoint, home: Optional[str] = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the federation id and key fingerprint as JSON."),
):
    """Create a federation on STORAGE, with this site as its founder and first member."""
    from p2pfed import node

    settings = Settings(mode=mode, configuration=configuration, fold=fold, rounds=rounds,
                        epochs_per_round=epochs_per_round, iterations_per_epoch=iterations_per_epoch,
                        val_iterations=val_iterations, sites=sites, quorum=quorum,
                        deadline_s=parse_duration(deadline), weighting=weighting, layers=layers,
                        trainer=trainer, planner=planner, plans_identifier=plans_identifier,
                        gpu_memory_target=gpu_memory_target, final_validation=not no_final_validation,
                        max_update_norm=max_update_norm, max_weight_share=max_weight_share,
                        admission_quorum=admission_quorum,
                        secure_aggregation=_secure_default(sites, secure_aggregation, no_secure_aggregation),
                        dp_clip=dp_clip, dp_noise_multiplier=dp_noise_multiplier, dp_delta=dp_delta,
                        sharded_from=sharded_from, optimizer_state=optimizer_state, learning_rate=learning_rate)
    opts = _local_options(site, dataset, nnunet_raw, nnunet_preprocessed, nnunet_results, device, endpoint, home)
    config, public = node.init(storage, opts, settings)
    from p2pfed.crypto import grouped

    federation = grouped(config.genesis_sha256)
    if as_json:
        return emit_json({"federation": config.federation, "federation_fingerprint": config.genesis_sha256,
                          "site": site, "fingerprint": public.fingerprint()})
    out.print(f"Created federation {config.federation} on {config.storage}")
    out.print(f"Federation fingerprint: {federation}")
    out.print(f"Site {site!r} is its founder. Key fingerprint: {public.fingerprint_text()}")
    out.print("Give the federation fingerprint to each joining site out of band (phone, e-mail); they join with:")
    out.print(f"  p2pfed join {config.storage} --site NAME --dataset ID --federation '{federation}'",
              markup=False, soft_wrap=True)


@app.command()
@handled
def join(
    storage: str = typer.Argument(..., help="The federation's shared storage."),
    site: str = SiteOpt, dataset: str = Dataset,
    max_weight_share: Optional[float] = typer.Option(None, "--max-weight-share", help="Cap any one contributor's share of a merge's total weight at S, 0 < S <= 1 (off by default)."),
    nnunet_raw: Optional[str] = Raw, nnunet_preprocessed: Optional[str] = Pre,
    nnunet_results: Optional[str] = Res, device: str = Device,
    endpoint: Optional[str] = Endpoint, home: Optional[str] = HomeOpt,
    federation: Optional[str] = typer.Option(None, "--federation", help="The federation fingerprint the founder gave you out of band (`p2pfed init` printed it); without it, join asks at a terminal and refuses elsewhere."),
    as_json: bool = typer.Option(False, "--json", help="Print the federation id and key fingerprint as JSON."),
):
    """Ask to join the federation on STORAGE. A member then runs `p2pfed admit`."""
    from p2pfed import node

    opts = _local_options(site, dataset, nnunet_raw, nnunet_preprocessed, nnunet_results, device, endpoint, home)
    ask = _ask_federation if sys.stdin.isatty() else None  # cron, scripts: --federation or nothing
    config, public, fed = node.join(storage, opts, federation, confirm=ask)
    if as_json:
        return emit_json({"federation": fed.id, "site": site, "fingerprint": public.fingerprint()})
    out.print(f"Join request for {site!r} published to federation {fed.id} (founder {fed.founder}).")
    out.print(f"Key fingerprint: {public.fingerprint_text()}")
    out.print(f"Read it to a member by phone or send it out of band; they run: "
              f"p2pfed admit {site} --site MEMBER --fingerprint '{public.fingerprint_text()}'")


def _ask_federation(fed) -> bool:
    """At a terminal, without --federation: the person compares the fingerprint themselves."""
    from p2pfed.crypto import grouped

    out.print(f"Federation {fed.id} on {fed.storage.url}, founded by {fed.founder!r}.", markup=False)
    out.print(f"Federation fingerprint: {grouped(fed.genesis_sha256)}")
    return typer.confirm("Is this the fingerprint the founder gave you?", default=False)


@app.command()
@handled
def admit(
    name: str = typer.Argument(..., help="The pending site to admit (or the member whose new keys you approve)."),
    site: str = typer.Option(..., "--site", help="Your own site (a member)."),
    fingerprint: str = typer.Option(..., "--fingerprint", help="The fingerprint the site sent you out of band (phone, e-mail), with or without spaces; a mismatch is refused."),
    endpoint: Optional[str] = Endpoint, home: Optional[str] = HomeOpt,
):
    """Propose or approve admitting a pending site, or a member's new keys (a majority of members must approve)."""
    from p2pfed import node

    outcome = node.admit(home, site, name, fingerprint, endpoint)
    if outcome is None:
        out.print(f"{name!r} is already a member; nothing to do.", markup=False)
        return
    from p2pfed.crypto import grouped

    _print_outcome(outcome, f"admit {name} --fingerprint '{grouped(outcome.fingerprint)}'")


@app.command()
@handled
def remove(
    name: str = typer.Argument(..., help="The member to remove."),
    site: str = typer.Option(..., "--site", help="Your own site (a member)."),
    endpoint: Optional[str] = Endpoint, home: Optional[str] = HomeOpt,
):
    """Propose or approve removing a member (a majority of members must approve). From the round it applies, nothing is encrypted to it."""
    from p2pfed import node

    outcome = node.remove(home, site, name, endpoint)
    if outcome is None:
        out.print(f"{name!r} is not a member; nothing to do.", markup=False)
        return
    _print_outcome(outcome, f"remove {name}")


@app.command("rotate-keys")
@handled
def rotate_keys(
    site: str = SiteOpt, endpoint: Optional[str] = Endpoint, home: Optional[str] = HomeOpt,
):
    """Propose new keys for your site; the other members approve them with `p2pfed admit` and the new fingerprint."""
    from p2pfed import node
    from p2pfed.crypto import grouped

    outcome = node.rotate_keys(home, site, endpoint)
    _print_outcome(outcome, f"admit {site} --fingerprint '{grouped(outcome.fingerprint)}'")
    out.print("Read the new fingerprint to the other members out of band; the old keys are deleted "
              "once the new epoch is in force.", markup=False)


def _print_outcome(outcome, command: str) -> None:
    """Say what a membership change needs still: how many approvals, from whom."""
    from p2pfed.crypto import grouped

    what = f"epoch {outcome.epoch}: {outcome.change['op']} {outcome.change['site']!r}"
    if outcome.fingerprint:
        what += f" (fingerprint {grouped(outcome.fingerprint)})"
    applies = f" It applies from round {outcome.from_round}." if outcome.from_round else ""
    if outcome.too_late:
        out.print(f"{outcome.too_late} came too late for the round it named; this is a new proposal.",
                  markup=False)
    if outcome.in_force:
        out.print(f"Approved {what}; it is in force ({len(outcome.approvers)} of {outcome.needed} approvals: "
                  f"{', '.join(outcome.approvers)}).{applies}", markup=False)
        return
    out.print(f"Approved {what}: {len(outcome.approvers)} of {outcome.needed} approvals, "
              f"{outcome.missing} more needed from {', '.join(outcome.waiting_on)}.{applies}", markup=False)
    out.print(f"Each of them runs: p2pfed {command} --site MEMBER", markup=False)


# --------------------------------------------------------------------------- progress
def _progress_bar():
    """A rich progress bar on a terminal; nothing under cron."""
    if not err.is_terminal:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err, transient=True)
    tasks: dict = {}

    def update(what, done, total):
        label = what if isinstance(what, str) else f"epoch {what}"
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=done, total=total)

    return bar, update


LOG_MAX_BYTES = 10 * 2**20  # tick.log is renamed to tick.log.1 beyond this


@contextlib.contextmanager
def _output_into(log: Path):
    """Send everything printed during a tick into the site's log: Python's sys.stdout and
    sys.stderr, and file descriptors 1 and 2 (nnU-Net's workers and C libraries write there)."""
    if log.exists() and log.stat().st_size > LOG_MAX_BYTES:
        log.replace(log.with_name(log.name + ".1"))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    with open(log, "a", buffering=1) as fh:
        fh.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} tick ====\n")
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                yield
        finally:
            fh.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def _tick(home, site, say, until=None, endpoint=None, to_log=False):
    """One tick under the site's lock. With `to_log`, all output goes to <site home>/tick.log."""
    from p2pfed import node
    from p2pfed.site import SiteHome, TickBusy
    from p2pfed.protocol import Report, Tick

    site_home = SiteHome(home, site)
    site_home.config()  # not set up here: say so before the lock makes a folder
    # nnU-Net prints freely; stdout is kept for this command's own result (--json, one line)
    output = _output_into(site_home.dir / "tick.log") if to_log else contextlib.redirect_stdout(sys.stderr)
    try:
        with site_home.lock(), output:
            home_, config, fed = node.open_site(home, site, endpoint, cached=True)
            bar, update = _progress_bar()
            if bar is None:
                return Tick(home_, config, fed, say=say, stop_after=until).run()
            with bar:
                return Tick(home_, config, fed, say=say, progress=update, stop_after=until).run()
    except TickBusy:
        return Report(site, phase="busy", message=f"another tick of site {site!r} is running; nothing done")


def _to_log(quiet: bool, verbose: bool) -> bool:
    """Quiet means one line: nnU-Net's output goes to the log under --quiet and under cron."""
    return not verbose and (quiet or not sys.stdout.isatty())


Quiet = typer.Option(False, "--quiet", "-q", help="One line per tick; all other output goes to "
                     "<home>/sites/NAME/tick.log (the default when stdout is not a terminal).")
Verbose = typer.Option(False, "--verbose", "-v", help="Show everything (nnU-Net's output too), even under cron.")


def _say(site: str):
    return lambda line: err.print(f"[dim]{site}:[/] {line}")


@app.command("round")
@handled
def round_(
    site: str = SiteOpt, home: Optional[str] = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print what the tick did as JSON."),
    quiet: bool = Quiet, verbose: bool = Verbose, endpoint: Optional[str] = Endpoint,
    until: Optional[str] = typer.Option(None, "--until", help="'plan': stop after fingerprinting and planning (prepare before training)."),
):
    """One idempotent tick: do every next step this site can, then exit. Call it from cron.

    Exit 0 also when waiting for other sites or when another tick is running."""
    if until not in (None, "plan"):
        raise UsageError("--until takes only 'plan'", "leave --until out, or give --until plan")
    report = _tick(home, site, _say(site), until, endpoint, to_log=_to_log(quiet or as_json, verbose))
    if as_json:
        emit_json(report.to_json())
    else:
        # one line for the cron log: what this tick did, then what it waits for now
        did = f"{'; '.join(report.actions)}; " if report.actions and report.message else \
            "; ".join(report.actions) if report.actions else ""
        out.print(f"{site}: {did}{report.message}", markup=False)


@app.command()
@handled
def run(
    site: str = SiteOpt, home: Optional[str] = HomeOpt,
    interval: float = typer.Option(60.0, "--interval", help="Seconds between ticks while waiting."),
    quiet: bool = Quiet, verbose: bool = Verbose, endpoint: Optional[str] = Endpoint,
):
    """Tick until the federation is finished (for machines without cron)."""
    from p2pfed.errors import StorageError

    while True:
        try:
            report = _tick(home, site, _say(site), endpoint=endpoint, to_log=_to_log(quiet, verbose))
        except StorageError as exc:  # transient outages must not end a days-long run
            err.print(f"p2pfed: storage problem, retrying in {interval:g} s: {exc.message}", markup=False)
            time.sleep(interval)
            continue
        if report.finished:
            out.print(f"{site}: {report.message}", markup=False)
            return
        if not report.actions:
            out.print(f"{site}: {report.message}", markup=False)
            time.sleep(interval)


# --------------------------------------------------------------------------- audit
@app.command()
@handled
def status(
    site: Optional[str] = typer.Option(None, "--site", help="Read as this site (decrypts metrics)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Read public progress of this storage, without a site."),
    endpoint: Optional[str] = Endpoint, home: Optional[str] = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the status document as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw per-site metric curves into this PNG."),
):
    """Show the federation: settings, members, pending joins, phase, rounds and metrics."""
    from p2pfed import status as statusmod

    doc = statusmod.document(home=home, site=site, storage=storage, endpoint=endpoint)
    drawn = statusmod.plot(doc, plot) if plot is not None else None
    if as_json:
        emit_json(doc)
    else:
        statusmod.render(doc, out)
    if plot is not None:
        why = "none yet" if site else "metrics are encrypted; use --site"
        (out if not as_json else err).print(f"Plot written to {plot}" if drawn else
                                            f"No metrics to plot ({why}); {plot} not written", markup=False)



@app.command()
@handled
def verify(
    site: str = SiteOpt, endpoint: Optional[str] = Endpoint, home: Optional[str] = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
):
    """Check every object in the shared storage, and that every site merged alike.

    Every signature, hash and envelope is checked. Exit 6 if an object fails, 7 if sites
    merged a round differently."""
    from p2pfed import node
    from p2pfed.errors import FederationHalted, IntegrityError
    from p2pfed.verify import verify_storage

    home_, _, fed = node.open_site(home, site, endpoint)
    findings = verify_storage(fed, home_.identity())
    bad = [f for f in findings if not f.ok]
    if as_json:
        emit_json({"ok": not bad, "objects": [f.__dict__ for f in findings]})
    else:
        for f in bad:
            err.print(f"BAD {f.key}: {f.detail}", markup=False, soft_wrap=True)
        out.print(f"{len(findings)} objects checked, {len(bad)} bad.")
    forks = [f for f in bad if f.disagreement]
    if forks:
        raise FederationHalted(f"{forks[0].detail}", "the sites hold different models; compare their p2pfed "
                               "versions and what each saw of the storage (`p2pfed status`)")
    if bad:
        raise IntegrityError(f"{len(bad)} bad object(s), first: {bad[0].key}: {bad[0].detail}")


# --------------------------------------------------------------------------- demo
@app.command()
@handled
def simulate(
    workdir: Path = typer.Argument(Path("p2pfed-demo"), help="New folder for the sites, homes and shared storage."),
    sites: int = typer.Option(3, "--sites", help="Number of synthetic sites."),
    mode: str = typer.Option("ffe", "--mode", help="ffe or asym."),
    rounds: int = typer.Option(3, "--rounds", help="Federated rounds."),
    iterations: int = typer.Option(150, "--iterations-per-epoch", help="nnU-Net iterations per epoch (250 in "
                                   "nnU-Net; 3 x 150 gets every site's Dice above 0.8 in minutes on a CPU)."),
    dim: int = typer.Option(2, "--dim", help="2 (2-D images, 2d configuration) or 3 (small volumes, 3d_fullres)."),
    size: int = typer.Option(64, "--size", help="2-D image side in voxels at 1 mm (each site scales it to its "
                             "spacing); large enough that the coarsest site's lesions are not a few voxels."),
    cases: int = typer.Option(10, "--cases", help="Training cases per site; nnU-Net's fold 0 validates on a fifth."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic data."),
    modalities: str = typer.Option("CT", "--modalities", help="Each site's modality, comma-separated and cycled "
                                   "over the sites: CT or MRI; e.g. CT,MRI (other modalities need --mode asym)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Shared storage (default: WORKDIR/shared)."),
    no_final_validation: bool = NoFinalValidation, _final_validation: bool = FinalValidation,
):
    """Run a whole federation of synthetic sites on this machine.

    Each site runs in its own process, ticking as cron would; the per-site results are
    printed at the end."""
    from p2pfed import simulate as sim, synthetic

    if workdir.exists() and any(workdir.iterdir()):
        raise UsageError(f"{workdir} exists and is not empty", "remove it or give another WORKDIR")
    if dim not in (2, 3):
        raise UsageError("--dim must be 2 or 3")
    if cases < 5:
        raise UsageError("--cases must be at least 5", "nnU-Net's 5-fold split needs them")
    kinds = [m.strip().upper() for m in modalities.split(",") if m.strip()]
    if not kinds or any(m not in synthetic.CHANNELS for m in kinds):
        raise UsageError(f"--modalities {modalities!r}: give CT or MRI, comma-separated", "e.g. --modalities CT,MRI")
    if len(set(kinds)) > 1 and mode != "asym":
        raise UsageError(f"--modalities {modalities}: {mode} needs every site in the same modality",
                         "add --mode asym (each site plans and normalizes its own data)")
    init_args = ["--mode", mode, "--rounds", str(rounds), "--iterations-per-epoch", str(iterations),
                 "--val-iterations", "2", "--configuration", "2d" if dim == 2 else "3d_fullres",
                 "--no-final-validation" if no_final_validation else "--final-validation"]
    out.print(f"Generating {sites} synthetic sites in {workdir} and forming the federation ...")
    simulation = sim.setup(workdir, sites, storage=storage, init_args=init_args, dim=dim, seed=seed,
                           n_train=cases, size=(size, size) if dim == 2 else None,
                           channels=[(kinds[i % len(kinds)],) for i in range(sites)])
    started = time.monotonic()
    doc = sim.run_until_done(simulation, say=lambda line: out.print(line, markup=False))
    out.print(f"Finished in {time.monotonic() - started:.0f} s and {simulation.ticks} ticks.")
    from p2pfed import status as statusmod

    statusmod.render_results(doc, out)
    out.print("Each site's final model is a standard nnU-Net results folder:", markup=False)
    for s in simulation.sites:
        out.print(f"  {s.name}: {s.folders['results']}", markup=False, soft_wrap=True)
    first = simulation.sites[0]
    images = first.folders["raw"] / f"Dataset{first.dataset_id:03d}_{first.name}" / "imagesTs"
    out.print(f"Predict with it (here {first.name}'s):\n  nnUNet_raw={first.folders['raw']} "
              f"nnUNet_preprocessed={first.folders['preprocessed']} nnUNet_results={first.folders['results']} "
              f"nnUNetv2_predict -i {images} -o {workdir.absolute() / 'predictions'} -d {first.dataset_id} "
              f"-c {'2d' if dim == 2 else '3d_fullres'} -f 0 -device cpu", markup=False, soft_wrap=True)
    out.print(f"Inspect it with: p2pfed status --site {first.name} --home {simulation.home}", markup=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
