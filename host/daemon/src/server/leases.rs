//! `containerd.services.leases.v1.Leases` over the host's own leases.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use wasnap::Error;

use super::{Shared, handle};
use crate::convert;
use crate::proto::leases::leases_server::Leases;
use crate::proto::leases::*;

/// The leases service.
#[derive(Debug, Clone)]
pub struct LeasesService {
    shared: Arc<Shared>,
}

impl LeasesService {
    /// The service over `shared`'s host.
    pub fn new(shared: Arc<Shared>) -> Self {
        LeasesService { shared }
    }
}

type Reply<T> = std::result::Result<Response<T>, Status>;

fn resource(r: Option<Resource>) -> wasnap::Result<wasnap::metadata::Resource> {
    r.map(convert::resource_from).ok_or_else(|| Error::invalid_argument("no resource given"))
}

#[tonic::async_trait]
impl Leases for LeasesService {
    async fn create(&self, req: Request<CreateRequest>) -> Reply<CreateResponse> {
        handle(&self.shared, "Leases.Create", req, |host, scope, r| {
            let ctx = scope.required()?;
            let id = (!r.id.is_empty()).then_some(r.id.as_str());
            let lease = host.leases().create(&ctx, id, &r.labels.into_iter().collect())?;
            Ok(CreateResponse { lease: Some(convert::lease(lease)) })
        })
        .await
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Reply<()> {
        handle(&self.shared, "Leases.Delete", req, |host, scope, r| {
            host.delete_lease(&scope.required()?, &r.id, r.sync).map(drop)
        })
        .await
    }

    async fn list(&self, req: Request<ListRequest>) -> Reply<ListResponse> {
        handle(&self.shared, "Leases.List", req, |host, scope, r| {
            let leases = host.leases().list(&scope.required()?, &r.filters)?;
            Ok(ListResponse { leases: leases.into_iter().map(convert::lease).collect() })
        })
        .await
    }

    async fn add_resource(&self, req: Request<AddResourceRequest>) -> Reply<()> {
        handle(&self.shared, "Leases.AddResource", req, |host, scope, r| {
            host.leases().add_resource(&scope.required()?, &r.id, &resource(r.resource)?)
        })
        .await
    }

    async fn delete_resource(&self, req: Request<DeleteResourceRequest>) -> Reply<()> {
        handle(&self.shared, "Leases.DeleteResource", req, |host, scope, r| {
            host.leases().delete_resource(&scope.required()?, &r.id, &resource(r.resource)?)
        })
        .await
    }

    async fn list_resources(
        &self,
        req: Request<ListResourcesRequest>,
    ) -> Reply<ListResourcesResponse> {
        handle(&self.shared, "Leases.ListResources", req, |host, scope, r| {
            let resources = host.leases().resources(&scope.required()?, &r.id)?;
            Ok(ListResourcesResponse {
                resources: resources.into_iter().map(convert::resource).collect(),
            })
        })
        .await
    }
}
