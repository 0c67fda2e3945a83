//! Code generated from `proto/` by the build script, nested as the proto packages are
//! (the generated code refers across packages with `super::`).
#![allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]

pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
        pub mod leases {
            pub mod v1 {
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }
    }
}

pub mod wasnap {
    pub mod v1 {
        tonic::include_proto!("wasnap.v1");
    }
}

pub use containerd::services::leases::v1 as leases;
pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types;
pub use wasnap::v1 as admin;
