"""Write synthetic, deliberately heterogeneous nnU-Net raw datasets: one per site, and
optionally their pooled union (the centralized baseline).

    python examples/make_sites.py RAW_DIR --sites 3 --channels MRI CT --pooled-id 199
"""
import argparse

from p2pfed.synthetic import make_federation, make_pooled, trainable_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", nargs="+", help="nnUNet_raw folder (one for all sites, or one per site)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--first-id", type=int, default=101, help="dataset id of the first site")
    parser.add_argument("--cases", type=int, nargs="+",
                        help="training cases, one number or one per site (default: 5 to 10, different per site; "
                             "init/join need at least 5)")
    parser.add_argument("--test-cases", type=int, default=2, help="held-out cases per site (imagesTs)")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2)
    parser.add_argument("--channels", nargs="+", default=["CT"], choices=["CT", "MRI"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pooled-id", type=int, help="also write the union as this dataset id (first raw folder)")
    args = parser.parse_args()
    cases = args.cases[0] if args.cases and len(args.cases) == 1 else args.cases
    if cases is None:
        cases = [trainable_cases(i) for i in range(args.sites)]
    sites = make_federation(args.raw[0] if len(args.raw) == 1 else args.raw, args.sites, first_id=args.first_id,
                            n_train=cases, n_test=args.test_cases, dim=args.dim, seed=args.seed,
                            channels=args.channels)
    for folder in sites:
        print(folder)
    if args.pooled_id is not None:
        print(make_pooled(sites, args.raw[0], args.pooled_id))


if __name__ == "__main__":
    main()
