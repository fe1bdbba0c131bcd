//! `clipft data`: the trainer's named datasets. A pushed dataset carries its images with it (see
//! `trainer::datasets`), so runs on the trainer never read the client's files.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::runs::TrainerAddr;
use crate::protocol::trainer as pb;
use crate::trainer::client;

#[derive(Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
    #[command(flatten)]
    pub addr: TrainerAddr,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Upload FILE (CSV or docarray v1) as dataset NAME.
    Push {
        /// The dataset's name, which runs then use in place of a file.
        name: String,
        /// The CSV or docarray v1 file; a CSV's local images travel with it.
        file: PathBuf,
        /// Replace a dataset of the same name.
        #[arg(long, env = "CLIPFT_OVERWRITE")]
        overwrite: bool,
    },
    /// Every dataset: name, format, items, size.
    List,
    /// Remove a dataset no unfinished run uses.
    Delete {
        /// The dataset's name.
        name: String,
    },
}

pub fn run(args: DataArgs) -> anyhow::Result<()> {
    super::runtime()?.block_on(async move {
        let mut c = args.addr.connect().await?;
        match args.command {
            DataCommand::Push {
                name,
                file,
                overwrite,
            } => {
                let d = client::push_dataset(&mut c, &name, &file, overwrite).await?;
                outln!("{} {} items {} bytes", d.name, d.items, d.bytes);
            }
            DataCommand::List => {
                let list = c
                    .list_datasets(pb::ListDatasetsRequest {})
                    .await?
                    .into_inner()
                    .datasets;
                outln!(
                    "{:<32} {:<10} {:>9} {:>12}",
                    "name",
                    "format",
                    "items",
                    "bytes"
                );
                for d in list {
                    let format = match pb::DatasetFormat::try_from(d.format) {
                        Ok(pb::DatasetFormat::CsvBundle) => "csv",
                        _ => "docarray",
                    };
                    outln!(
                        "{:<32} {:<10} {:>9} {:>12}",
                        d.name,
                        format,
                        d.items,
                        d.bytes
                    );
                }
            }
            DataCommand::Delete { name } => {
                c.delete_dataset(pb::DeleteDatasetRequest { name: name.clone() })
                    .await?;
                outln!("deleted {name}");
            }
        }
        Ok(())
    })
}
